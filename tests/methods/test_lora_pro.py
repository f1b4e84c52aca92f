"""LoRA-Pro's properties (specs/methods.md, group C): s(B·g̃_A + g̃_B·A) is the Frobenius projection of the full
gradient onto the LoRA tangent space {B·X + Y·A}; the optimizer takes Adam's step on that m×n gradient and maps it
back to (A, B); its state survives state_dict()/load_state_dict()."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from methods.lora_pro import LoRAProAdam, adjusted_gradients, equivalent_gradient, solve_sylvester
from tests.helpers import tiny, wrapped


def tangent_projection(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """argmin over X (r×n), Y (m×r) of ‖B·X + Y·A − G‖_F, returned as B·X + Y·A: an explicit least-squares solve
    on the vectorised (column-major) linear map (X, Y) ↦ B·X + Y·A."""
    m, n = g.shape
    a, b, g = a.double(), b.double(), g.double()
    op = torch.cat([torch.kron(torch.eye(n, dtype=torch.float64), b),  # vec(B·X) = (I_n ⊗ B)·vec(X)
                    torch.kron(a.T.contiguous(), torch.eye(m, dtype=torch.float64))],  # vec(Y·A) = (Aᵀ ⊗ I_m)·vec(Y)
                   dim=1)  # (m·n, r·n + m·r)
    sol = torch.linalg.lstsq(op, g.T.reshape(-1, 1), driver="gelsd").solution  # rank-deficient: r² directions overlap
    return (op @ sol).reshape(n, m).T  # (m, n)


def lora_grads(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA gradients of A and B when the loss has full-weight gradient G at W0 + s·B·A."""
    return s * b.T @ g, s * g @ a.T


@pytest.mark.parametrize("m,n,r", [(7, 5, 2), (12, 9, 3), (6, 11, 4)])
def test_equivalent_gradient_is_the_projection_onto_the_tangent_space(m, n, r):
    gen = torch.Generator().manual_seed(m * n * r)
    a, b, g = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in [(r, n), (m, r), (m, n)])
    s = 2.0
    ga, gb = adjusted_gradients(a, b, *lora_grads(a, b, g, s), s)
    projected = equivalent_gradient(a, b, ga, gb, s)
    expected = tangent_projection(a, b, g)
    torch.testing.assert_close(projected, expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    residual = g - projected  # orthogonal to the tangent space: to every B·X and every Y·A
    assert (b.T @ residual).abs().max() < 1e-6 and (residual @ a.T).abs().max() < 1e-6
    plain = equivalent_gradient(a, b, *lora_grads(a, b, g, s), s)  # LoRA's own equivalent gradient is not it
    assert (plain - expected).abs().max() > 1e-2


def test_projection_holds_on_a_trained_model_layer():
    """The same property with the gradients of a real model: the LoRA gradients of a layer and the gradient of its
    frozen weight (the full gradient G), after two LoRA-Pro steps so that B ≠ 0."""
    t = tiny("lora_pro", extra=["method.r=2"])
    torch.manual_seed(0)
    method, model = wrapped(t)
    model.eval()  # no dropout: one function, one gradient
    optimizer = method.make_optimizer(model)
    for _ in range(2):
        optimizer.zero_grad()
        model(**t.batch).loss.backward()
        optimizer.step()
    name, layer = sorted(method.lora_layers(model).items())[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, n), (m, r)
    w0 = layer.get_base_layer().weight
    assert b.abs().max() > 0
    optimizer.zero_grad()
    w0.requires_grad_(True)
    try:
        loss = model(**t.batch).loss
        g, ga, gb = torch.autograd.grad(loss, [w0, a, b])
    finally:
        w0.requires_grad_(False)
    s = layer.scaling["default"]
    torch.testing.assert_close(ga, s * b.T @ g, rtol=1e-4, atol=1e-7)  # the chain rule the derivation rests on
    # δ = 1e-8 shifts the projection by ~δ/σ_min(B)², which is not small while B is young (σ_min ≈ 4e-4 here):
    # the property is the δ → 0 one
    adj_a, adj_b = adjusted_gradients(a.detach().double(), b.detach().double(), ga.double(), gb.double(), s,
                                      delta=1e-20)
    projected = equivalent_gradient(a.detach().double(), b.detach().double(), adj_a, adj_b, s)
    expected = tangent_projection(a.detach(), b.detach(), g)
    scale = expected.abs().max().item()
    torch.testing.assert_close(projected, expected, rtol=0, atol=1e-4 * scale)  # fp32 gradients, amplified by 1/σ(B)
    plain = equivalent_gradient(a.detach().double(), b.detach().double(), ga.double(), gb.double(), s)
    assert (plain - expected).abs().max() > 0.1 * scale


def test_balanced_split_is_the_closest_to_the_raw_gradients():
    """X changes only how the projected gradient is split between A and B; the Sylvester solution is the split
    closest to (g_A, g_B): any other X + Z moves further away."""
    gen = torch.Generator().manual_seed(1)
    m, n, r, s = 10, 8, 3, 2.0
    a, b, g = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in [(r, n), (m, r), (m, n)])
    raw_a, raw_b = lora_grads(a, b, g, s)
    ga, gb = adjusted_gradients(a, b, raw_a, raw_b, s)
    ga0, gb0 = adjusted_gradients(a, b, raw_a, raw_b, s, balance=False)
    torch.testing.assert_close(equivalent_gradient(a, b, ga, gb, s), equivalent_gradient(a, b, ga0, gb0, s))

    def distance(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - raw_a).pow(2).sum() + (y - raw_b).pow(2).sum())

    best = distance(ga, gb)
    assert best < distance(ga0, gb0)
    for _ in range(20):
        z = 0.1 * torch.randn(r, r, generator=gen, dtype=torch.float64)
        assert best < distance(ga + z @ a, gb - b @ z)


def test_sylvester_solution():
    gen = torch.Generator().manual_seed(2)
    p, q, c = (torch.randn(4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    p, q = p @ p.T, q @ q.T
    x = solve_sylvester(p, q, c)
    torch.testing.assert_close(p @ x + x @ q, c)


def test_first_step_adjusts_only_g_b_and_agrees_with_the_general_rule_at_b_zero():
    gen = torch.Generator().manual_seed(3)
    m, n, r, s = 9, 6, 2, 2.0
    a, g = torch.randn(r, n, generator=gen, dtype=torch.float64), torch.randn(m, n, generator=gen, dtype=torch.float64)
    b = torch.randn(m, r, generator=gen, dtype=torch.float64)
    raw_a, raw_b = lora_grads(a, b, g, s)
    ga, gb = adjusted_gradients(a, b, raw_a, raw_b, s, first_step=True)
    assert torch.equal(ga, raw_a)
    torch.testing.assert_close(gb, raw_b @ torch.linalg.inv(a @ a.T) / s**2)
    zero = torch.zeros(m, r, dtype=torch.float64)  # LoRA's B0 = 0: both rules give G·P_A
    raw_a, raw_b = lora_grads(a, zero, g, s)
    first = equivalent_gradient(a, zero, *adjusted_gradients(a, zero, raw_a, raw_b, s, first_step=True), s)
    general = equivalent_gradient(a, zero, *adjusted_gradients(a, zero, raw_a, raw_b, s), s)
    torch.testing.assert_close(first, general)
    torch.testing.assert_close(first, g @ a.T @ torch.linalg.inv(a @ a.T) @ a)


def test_optimizer_step_is_adam_on_the_projected_gradient():
    """On L = ½‖W0 + s·B·A − T‖², each step's first-order change s(ΔB·A + B·ΔA) equals −lr·P(Adam direction), where
    Adam runs on P(G) with P the tangent-space projection (computed here by least squares) and t = 1, 2, ..."""
    gen = torch.Generator().manual_seed(4)
    m, n, r, s, lr, betas, eps = 8, 6, 2, 2.0, 0.05, (0.9, 0.999), 1e-8
    w0, target = torch.randn(m, n, generator=gen), torch.randn(m, n, generator=gen)
    a = torch.nn.Parameter(torch.randn(r, n, generator=gen) / n**0.5)
    b = torch.nn.Parameter(torch.zeros(m, r))  # B0 = 0, as LoRA
    opt = LoRAProAdam([{"params": [a, b], "lora_pro": True, "scaling": s}], lr=lr, betas=betas, eps=eps)
    m1, m2 = torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64)
    for t in range(1, 5):
        opt.zero_grad()
        w = w0 + s * b @ a
        (0.5 * (w - target).pow(2).sum()).backward()
        g = (w - target).detach()  # the full gradient
        a_old, b_old = a.detach().clone(), b.detach().clone()
        opt.step()
        g_proj = tangent_projection(a_old, b_old, g)
        m1 = betas[0] * m1 + (1 - betas[0]) * g_proj
        m2 = betas[1] * m2 + (1 - betas[1]) * g_proj**2
        direction = (m1 / (1 - betas[0] ** t)) / ((m2 / (1 - betas[1] ** t)).sqrt() + eps)
        expected = -lr * tangent_projection(a_old, b_old, direction)
        da, db = a.detach().double() - a_old.double(), b.detach().double() - b_old.double()
        first_order = s * (db @ a_old.double() + b_old.double() @ da)
        torch.testing.assert_close(first_order, expected, rtol=0, atol=2e-4 * expected.abs().max().item())
    assert opt.state[a]["step"] == 4 and opt.state[a]["exp_avg"].shape == (m, n)


def test_make_optimizer_pairs_every_lora_layer_and_trains_heads_with_adamw():
    t = tiny("lora_pro")
    method, model = wrapped(t)
    opt = method.make_optimizer(model)
    assert isinstance(opt, LoRAProAdam)
    pairs = [g for g in opt.param_groups if g["lora_pro"]]
    layers = method.lora_layers(model)
    assert len(pairs) == len(layers)
    assert all(g["scaling"] == pytest.approx(method.alpha / method.r) for g in pairs)
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in method.trainable_parameters(model).values()}
    assert not any(id(p) in {id(q) for g in pairs for q in g["params"]}
                   for p in model.get_submodule("base_model.model.classifier").parameters())


def test_optimizer_state_dict_round_trip():
    """Save the optimizer mid-run, load it into a fresh one over a copy of the model: the next steps are identical."""
    t = tiny("lora_pro")
    torch.manual_seed(0)
    method, model = wrapped(t)
    model.eval()
    batches = [t.batch, *t.calibration]
    opt = method.make_optimizer(model, weight_decay=0.01)
    initial = {n: p.detach().clone() for n, p in method.trainable_parameters(model).items()}

    def step(m: torch.nn.Module, o: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
        o.zero_grad()
        m(**batch).loss.backward()
        o.step()

    for batch in batches[:2]:
        step(model, opt, batch)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    fresh_model = copy.deepcopy(model)
    fresh_opt = method.make_optimizer(fresh_model, weight_decay=0.01)
    buffer.seek(0)
    fresh_opt.load_state_dict(torch.load(buffer))
    pair_state = fresh_opt.state[fresh_opt.param_groups[0]["params"][0]]
    assert pair_state["step"] == 2 and pair_state["exp_avg"].abs().max() > 0
    for batch in batches[2:]:
        step(model, opt, batch)
        step(fresh_model, fresh_opt, batch)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh_model.named_parameters()):
        assert torch.equal(p, q), name
    now = method.trainable_parameters(model)
    assert all(not torch.equal(now[n], p0) for n, p0 in initial.items() if "lora_B" in n)  # the steps moved B

"""IncreLoRA's properties (specs/methods.md, group D): the total rank never exceeds the budget and reaches it; adding
a component does not change the output (preserve_output_on_growth, the default; with it off, the reference's α/ρ
rescale multiplies ΔW by ρ_old/ρ_new); the folded-in scale re-expresses the AdamW moments as the gradient transforms;
the importance is |ΔW ⊙ ∂L/∂ΔW|; growth keeps the optimizer state of surviving parameters and starts new ones fresh; a
run resumed after a growth event ends exactly where the uninterrupted run does, in both modes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bench.train import Trainer
from methods.base import head_parameter_count
from methods.increlora import IncreLoRA, IncreLoRALinear
from tests.helpers import logits, tiny, wrapped
from tests.methods.resume import resume_matches_uninterrupted


def increlora(extra: list[str] | None = None):
    t = tiny("increlora", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, IncreLoRA)
    return t, method, model


def layers(method: IncreLoRA, model: torch.nn.Module) -> dict[str, IncreLoRALinear]:
    return method.adapted_layers(model)  # type: ignore[return-value]


def trainer(model, method, loader, steps: int) -> Trainer:
    cfg = SimpleNamespace(max_steps=steps, grad_accum=1, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0)
    return Trainer(model, method, loader, cfg, torch.device("cpu"), None)


def unscaled(layer: IncreLoRALinear) -> torch.Tensor:
    """Σ e_i·b_i·a_iᵀ (float64): the update before the α/ρ scaling."""
    a, b, e = (x.detach().double() for x in layer.stacked())
    return (b * e) @ a


@pytest.mark.parametrize("incre_rank_num, budget", [(1, None), (2, 19)])
def test_total_rank_never_exceeds_the_budget_and_reaches_it(incre_rank_num, budget):
    extra = ["method.init_warmup=1", "method.incre_interval=1", "method.top_h=5", "method.target_rank=3",
             f"method.incre_rank_num={incre_rank_num}"] + ([f"method.target_total_rank={budget}"] if budget else [])
    t, method, model = increlora(extra)
    budget = budget or 3 * len(layers(method, model))
    totals, run = [], trainer(model, method, t.loader, steps=12)
    for _ in range(12):
        run.step()
        totals.append(sum(method.ranks(model).values()))
        assert totals[-1] == method.total_rank <= budget
    assert totals[0] == len(layers(method, model))  # no growth at steps 0, 1 (warmup)
    assert totals[-1] == budget and max(totals) == budget
    for layer in layers(method, model).values():  # budget spent: reserves gone, scores no longer tracked
        assert layer.n_components == layer.n_active and not layer.track
    count = head_parameter_count(t.base, t.ctx) + sum(
        layer.n_active * (layer.in_features + layer.out_features + 1) for layer in layers(method, model).values())
    assert sum(p.numel() for p in method.trainable_parameters(model).values()) == count
    assert method.post_train(model, t.ctx)["increlora_total_rank"] == budget


def scaled(layer: IncreLoRALinear) -> torch.Tensor:
    """ΔW = (α/ρ)·Σ e_i·b_i·a_iᵀ (float64)."""
    return (layer.alpha / layer.n_active) * unscaled(layer)


@pytest.mark.parametrize("preserve", [True, False])
@pytest.mark.parametrize("advance_learn", [False, True])
def test_adding_a_component_keeps_the_output_or_rescales_the_update_by_rho_old_over_rho_new(advance_learn, preserve):
    """preserve_output_on_growth: ΔW and the logits are unchanged (up to the fresh reserve's e = 1e-5 term with advance
    learning, which is checked exactly at the ΔW level and removed for the logits). Off: ΔW_after = ΔW_before·ρ_old/ρ_new
    (+ that term), the logits move, and undoing the α/ρ rescale restores them."""
    t, method, model = increlora([f"method.advance_learn={str(advance_learn).lower()}", "method.top_h=3",
                                  f"method.preserve_output_on_growth={str(preserve).lower()}"])
    assert method.preserve_output_on_growth is preserve
    with torch.no_grad():  # a trained-looking update: non-zero e on the active components, large enough to move logits
        for layer in layers(method, model).values():
            for i in range(layer.n_active):
                layer.E[i].fill_(40.0)
    names = list(layers(method, model))
    method.ema = {n: [1.0, float(i)] for i, n in enumerate(names)}  # scores rise with the layer index
    before = {n: scaled(layer) for n, layer in layers(method, model).items()}
    rho = {n: layer.n_active for n, layer in layers(method, model).items()}
    out = logits(model, t.batch)
    reserve = {n: layer.A[layer.n_active] for n, layer in layers(method, model).items()}  # the next to join

    grown = method.grow(model)
    assert grown == {n: 1 for n in names[::-1][:3]}  # the top_h layers by Ī·Ū
    for name, layer in layers(method, model).items():
        assert layer.n_active == rho[name] + grown.get(name, 0)
        assert layer.n_components - layer.n_active == method.incre_rank_num  # a fresh reserve
        if name not in grown:
            assert torch.equal(scaled(layer), before[name]), name
            continue
        assert layer.A[rho[name]] is reserve[name]  # the reserve component joined, not a new one
        fresh = torch.zeros_like(before[name])  # the fresh reserve's (α/ρ_new)·e·b·aᵀ, e = 1e-5 or 0
        if advance_learn:
            a, b = layer.A[-1].detach().double(), layer.B[-1].detach().double()
            fresh = (layer.alpha / layer.n_active) * method.reserve_e * b @ a
            assert 0 < fresh.abs().max() < 1e-5 * before[name].abs().max()
        factor = 1.0 if preserve else rho[name] / layer.n_active  # ΔW_after = ΔW_before·ρ_old/ρ_new without it
        torch.testing.assert_close(scaled(layer), before[name] * factor + fresh, rtol=1e-6, atol=1e-12)
        with torch.no_grad():  # remove the fresh reserve's term: the rest must be exact
            for e in list(layer.E)[layer.n_active:]:
                e.zero_()
    after = logits(model, t.batch)
    if preserve:
        torch.testing.assert_close(after, out, rtol=1e-5, atol=1e-5)  # fp32 rounding of the fold-in only
    else:
        assert (after - out).abs().max() > 1e-2  # the output jumps
        for name in grown:  # undo the α/ρ rescale
            layers(method, model)[name].alpha = method.alpha * layers(method, model)[name].n_active / rho[name]
        torch.testing.assert_close(logits(model, t.batch), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preserve", [True, False])
def test_growth_re_expresses_the_adam_moments_as_the_gradient_transforms(preserve):
    """With the fold-in, e ← c·e (c = ρ_new/ρ_old) with the output unchanged, so ∂L/∂e ← ∂L/∂e / c; the moments follow:
    exp_avg ← exp_avg / c, exp_avg_sq ← exp_avg_sq / c², so m/√v (the next update's direction) is kept. Without it,
    e and its moments are left alone."""
    t, method, model = increlora(["method.advance_learn=false", "method.orth_reg_weight=0", "method.init_warmup=50",
                                  "method.incre_interval=100", "method.top_h=2",
                                  f"method.preserve_output_on_growth={str(preserve).lower()}"])
    run = trainer(model, method, t.loader, steps=20)
    for _ in range(3):  # no growth: step <= init_warmup
        run.step()
    assert method.total_rank == len(layers(method, model))

    def grad_e0() -> dict[str, torch.Tensor]:
        model.eval()
        model.zero_grad(set_to_none=True)
        model(**t.batch).loss.backward()
        return {n: layer.E[0].grad.detach().clone() for n, layer in layers(method, model).items()}

    state = run.optimizer.state
    e0 = {n: layer.E[0].detach().clone() for n, layer in layers(method, model).items()}
    m0 = {n: state[layer.E[0]]["exp_avg"].clone() for n, layer in layers(method, model).items()}
    v0 = {n: state[layer.E[0]]["exp_avg_sq"].clone() for n, layer in layers(method, model).items()}
    g0 = grad_e0()
    assert all(m.abs().max() > 0 for m in m0.values()) and all(g.abs().max() > 0 for g in g0.values())
    assert method.on_step_end(model, 100, run.optimizer)  # a growth, through the training loop's hook
    grown = [n for n, layer in layers(method, model).items() if layer.n_active > 1]
    assert len(grown) == 2
    g1 = grad_e0()
    for name, layer in layers(method, model).items():
        c = layer.n_active if preserve else 1.0  # ρ_old = 1
        p = layer.E[0]
        torch.testing.assert_close(p.detach(), e0[name] * c, rtol=1e-6, atol=0)
        torch.testing.assert_close(state[p]["exp_avg"], m0[name] / c, rtol=1e-6, atol=0)
        torch.testing.assert_close(state[p]["exp_avg_sq"], v0[name] / c**2, rtol=1e-6, atol=0)
        if preserve:  # same output: the gradient is divided by c, as the moments were
            torch.testing.assert_close(g1[name], g0[name] / c, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(state[p]["exp_avg"] / state[p]["exp_avg_sq"].sqrt(), m0[name] / v0[name].sqrt())


def test_importance_is_delta_times_its_gradient():
    t, method, model = increlora()
    with torch.no_grad():
        for layer in layers(method, model).values():
            for e in layer.E:
                e.fill_(0.3)
    name, layer = next(iter(layers(method, model).items()))
    layer.base.weight.requires_grad_(True)  # ∂L/∂W0 = ∂L/∂ΔW: the forward uses W0 + ΔW
    model.train()
    model(**t.batch).loss.backward()
    grad, delta = layer._delta_grad, layer.delta().detach()
    torch.testing.assert_close(grad, layer.base.weight.grad, rtol=1e-5, atol=1e-8)
    expected = float((delta * grad).abs().sum()) / math.sqrt(delta.numel())
    assert expected > 0
    assert layer.take_score() == pytest.approx(expected, rel=1e-6)
    assert layer.take_score() is None  # consumed


def test_growth_keeps_the_state_of_surviving_parameters_and_starts_new_ones_fresh():
    t, method, model = increlora(["method.init_warmup=1", "method.incre_interval=3", "method.top_h=2"])
    run = trainer(model, method, t.loader, steps=6)
    before = None
    for step in range(5):  # growth at step 3, one more step after it
        if step == 3:
            before = {n: (layer.n_active, layer.n_components) for n, layer in layers(method, model).items()}
        run.step()
    grown = [n for n, layer in layers(method, model).items() if layer.n_active > before[n][0]]
    assert len(grown) == 2
    state = run.optimizer.state
    for name in grown:
        layer = layers(method, model)[name]
        i = before[name][0]  # the reserve component that joined
        assert int(state[layer.A[i]]["step"]) == 5  # pre-trained in reserve from step 0: its moments carried over
        assert int(state[layer.E[i]]["step"]) == 1  # e was frozen until the growth: fresh state
        assert int(state[layer.A[-1]]["step"]) == 1  # the new reserve: fresh state
    optimized = {p for g in run.optimizer.param_groups for p in g["params"]}
    assert optimized == set(method.trainable_parameters(model).values())


def test_extra_loss_is_the_orthogonality_of_the_stacked_factors():
    t, method, model = increlora()
    loss = method.extra_loss(model, t.batch, None)
    terms = []
    for layer in layers(method, model).values():
        a = torch.cat([p.detach() for p in layer.A])  # (k, n)
        b = torch.cat([p.detach() for p in layer.B], dim=1)  # (m, k)
        eye = torch.eye(a.shape[0])
        terms += [torch.linalg.norm(a @ a.T - eye), torch.linalg.norm(b.T @ b - eye)]
    torch.testing.assert_close(loss.detach(), method.orth_reg_weight * torch.stack(terms).mean())


@pytest.mark.parametrize("advance_learn, preserve", [(True, True), (False, True), (True, False), (False, False)])
def test_resume_after_a_growth_equals_the_uninterrupted_run(tmp_path, advance_learn, preserve):
    extra = ["method.init_warmup=1", "method.incre_interval=2", "method.top_h=2", "method.target_rank=2",
             f"method.advance_learn={str(advance_learn).lower()}",
             f"method.preserve_output_on_growth={str(preserve).lower()}"]
    # growths at steps 2, 4, 6, 8; checkpoint after step 4 (one growth done), kill after step 6
    (method, model), (resumed, model2) = resume_matches_uninterrupted("increlora", extra, tmp_path, steps=10, every=4,
                                                                     die_after=6)
    n_layers = len(layers(method, model))
    assert method.total_rank == resumed.total_rank == n_layers + 4 * 2
    assert method.ranks(model) == resumed.ranks(model2)

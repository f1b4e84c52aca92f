"""GaLore's properties (specs/methods.md, group C): the update of a projected weight lies in span(P), P holds the
top-r singular directions of the gradient it was refreshed from, the Adam state of a projected weight is m×r or
r×n, the optimizer follows the paper's Algorithm 2, and its state_dict resumes a run exactly."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from methods.galore import GaLoreAdamW
from tests.helpers import tiny


def setup(extra: list[str] | None = None, weight_decay: float = 0.0, dtype: torch.dtype = torch.float32):
    t = tiny("galore", extra=["method.update_proj_gap=2", *(extra or [])])
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx).to(dtype)
    model.eval()  # no dropout: every run below sees the same gradients
    optimizer = method.make_optimizer(model, weight_decay=weight_decay)
    batches = [t.batch, *t.calibration]
    return t, method, model, optimizer, batches


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()


def in_span(delta: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """delta projected onto span(P): delta·PᵀP when P is V_rᵀ (r, n), P·Pᵀ·delta when P is U_r (m, r)."""
    right = delta.shape[0] >= delta.shape[1]
    return delta @ proj.mT @ proj if right else proj @ proj.mT @ delta


def test_update_lies_in_span_of_the_projector_and_projector_holds_the_top_gradient_directions():
    t, method, model, optimizer, batches = setup(dtype=torch.float64)  # ΔW free of fp32 rounding of W
    weights = {n: model.get_submodule(n).weight for n in method._targets}
    sides = set()
    for i, batch in enumerate(batches[:4]):  # T = 2: refreshes at steps 0 and 2
        before = {n: w.detach().clone() for n, w in weights.items()}
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads = {n: w.grad.detach().clone() for n, w in weights.items()}
        optimizer.step()
        for name, w in weights.items():
            proj = optimizer.state[w]["projector"]
            delta = (w.detach() - before[name]).double()
            assert delta.abs().max() > 0, f"step {i}: {name} did not move"
            residual = delta - in_span(delta, proj.double())
            assert residual.norm() <= 1e-9 * delta.norm(), (i, name, float(residual.norm() / delta.norm()))
            r = min(method.r, *w.shape)
            sides.add(tuple(proj.shape) == (r, w.shape[1]))
            torch.testing.assert_close(proj.double() @ proj.double().mT if proj.shape[0] == r
                                       else proj.double().mT @ proj.double(), torch.eye(r, dtype=torch.float64),
                                       atol=1e-5, rtol=0)
            if i % method.update_proj_gap == 0:  # refreshed from this gradient: it keeps G's top-r energy
                g = grads[name].double()
                sv = torch.linalg.svdvals(g)
                captured = g @ proj.double().mT if proj.shape[0] == r else proj.double().mT @ g
                torch.testing.assert_close(captured.norm() ** 2, (sv[:r] ** 2).sum(), rtol=1e-4, atol=0)
    assert sides == {True, False}, "the tiny model should exercise both projection sides"


def test_projected_state_is_r_by_n_or_m_by_r_and_the_rest_is_adamw():
    t, method, model, optimizer, batches = setup()
    step(model, optimizer, batches[0])
    targets = {id(model.get_submodule(n).weight) for n in method._targets}
    shapes = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if id(p) in targets:
                m, n = p.shape
                r = min(method.r, m, n)
                expected = (m, r) if m >= n else (r, n)
                assert state["exp_avg"].shape == expected and state["exp_avg_sq"].shape == expected
                assert state["projector"].shape == ((r, n) if m >= n else (m, r))
                shapes.add(expected)
            else:
                assert group["rank"] is None and state["exp_avg"].shape == p.shape
    assert any(s[0] == method.r for s in shapes) and any(s[1] == method.r for s in shapes), shapes
    galore_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                       if torch.is_tensor(v))
    adamw_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    target_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if id(p) in targets)
    assert galore_bytes < adamw_bytes - 0.8 * target_bytes


def test_matches_the_papers_algorithm_on_a_single_weight():
    """Algorithm 2 of the paper, written out in float64: P refreshed every T steps from the SVD of G, moments kept
    across refreshes, W ← W(1 − lr·λ) − lr·α·P·M̂/(√V̂ + ε)."""
    torch.manual_seed(0)
    lr, alpha, wd, r, gap, (b1, b2), eps = 1e-2, 0.5, 0.1, 3, 2, (0.9, 0.999), 1e-8
    for shape in [(7, 5), (5, 7)]:
        grads = [torch.randn(shape, dtype=torch.float64) for _ in range(5)]
        w = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
        opt = GaLoreAdamW([{"params": [w], "rank": r, "scale": alpha, "update_proj_gap": gap}], lr=lr,
                          betas=(b1, b2), eps=eps, weight_decay=wd)
        ref = w.detach().clone()
        m = v = proj = None
        for t, g in enumerate(grads):
            w.grad = g.clone()
            opt.step()
            if t % gap == 0:
                u, _, vh = torch.linalg.svd(g)
                proj = vh[:r].T if shape[0] >= shape[1] else u[:, :r]  # (n, r) or (m, r): orthonormal columns
            low = g @ proj if shape[0] >= shape[1] else proj.T @ g
            m = (1 - b1) * low if m is None else b1 * m + (1 - b1) * low
            v = (1 - b2) * low**2 if v is None else b2 * v + (1 - b2) * low**2
            n_t = (m / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + eps)
            ref = ref * (1 - lr * wd) - lr * alpha * (n_t @ proj.T if shape[0] >= shape[1] else proj @ n_t)
            torch.testing.assert_close(w.detach(), ref, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_resumes_exactly():
    t, method, model, optimizer, batches = setup(weight_decay=0.01)
    for batch in batches[:3]:
        step(model, optimizer, batch)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors and plain values only

    resumed = copy.deepcopy(model)
    optimizer2 = method.make_optimizer(resumed, weight_decay=0.01)
    optimizer2.load_state_dict(saved)
    for batch in [*batches[3:], batches[0], batches[1]]:  # steps 4..6 cross the refresh at step 4
        step(model, optimizer, batch)
        step(resumed, optimizer2, batch)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name} differs after resuming"
    assert not torch.equal(model.get_submodule(method._targets[0]).weight, t.base.get_submodule(method._targets[0])
                           .weight)


def test_rejects_non_matrix_projected_parameters():
    with pytest.raises(ValueError):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "rank": 2}])

"""FRUGAL's properties (specs/methods.md, group C): ρ = 1 is AdamW exactly, ρ = 0 is signSGD exactly, in between
the state lives in the subspace only and the remainder moves by signSGD, the subspace is redrawn every T steps with
Adam's state reset, and the optimizer's state_dict resumes a run exactly."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from tests.helpers import tiny

LR, WD = 1e-3, 0.01


def setup(projection: str, density: float, gap: int = 200, kappa: float = 0.1, reset: bool = True,
          dtype: torch.dtype = torch.float32):
    t = tiny("frugal", extra=[f"method.projection={projection}", f"method.density={density}",
                              f"method.update_gap={gap}", f"method.inactive_lr_scale={kappa}", f"method.lr={LR}",
                              f"method.reset_statistics={str(reset).lower()}"])
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx).to(dtype)
    model.eval()  # no dropout: every run below sees the same gradients
    return t, method, model, method.make_optimizer(model, weight_decay=WD), [t.batch, *t.calibration]


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()


def state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for p in params for v in optimizer.state[p].values()
               if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.parametrize("projection", ["randk", "columns", "rows", "block"])
def test_density_one_is_adamw_exactly(projection):
    t, method, model, optimizer, batches = setup(projection, 1.0)
    reference = copy.deepcopy(model)
    adamw = torch.optim.AdamW(method.param_groups(reference, WD), lr=LR, foreach=False)
    for batch in batches:
        step(model, optimizer, batch)
        step(reference, adamw, batch)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), f"{name}: max |diff| {float((a - b).abs().max())}"
    assert not torch.equal(model.get_submodule(method._targets[0]).weight,
                           t.base.get_submodule(method._targets[0]).weight)


@pytest.mark.parametrize("projection", ["svd", "randk", "columns", "rows", "block"])
def test_density_zero_is_signsgd_exactly(projection):
    kappa = 0.5
    t, method, model, optimizer, batches = setup(projection, 0.0, gap=2, kappa=kappa)
    targets = [model.get_submodule(n).weight for n in method._targets]
    for batch in batches:  # crosses refreshes at steps 2 and 4
        before = [w.detach().clone() for w in targets]
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads = [w.grad.detach().clone() for w in targets]
        optimizer.step()
        for w, w0, g in zip(targets, before, grads):
            assert torch.equal(w.detach(), w0 * (1 - LR * WD) - LR * kappa * g.sign())
    assert state_bytes(optimizer, targets) == 0, "ρ = 0 keeps no Adam state for the target weights"


@pytest.mark.parametrize("projection", ["svd", "columns", "randk"])
def test_partial_density_keeps_state_in_the_subspace_and_signsgd_elsewhere(projection):
    kappa = 0.5
    t, method, model, optimizer, batches = setup(projection, 0.25, kappa=kappa, dtype=torch.float64)
    targets = [model.get_submodule(n).weight for n in method._targets]
    before = [w.detach().clone() for w in targets]
    optimizer.zero_grad(set_to_none=True)
    model(**batches[0]).loss.backward()
    grads = [w.grad.detach().clone() for w in targets]
    optimizer.step()
    for w, w0, g in zip(targets, before, grads):
        state, (m, n) = optimizer.state[w], w.shape
        step_ = w.detach() - w0 * (1 - LR * WD)  # (m, n): the update without weight decay
        adam_first = -LR * g / (g.abs() + 1e-8)  # Adam's first (bias-corrected) step on a coordinate of S
        if projection in ("columns", "randk"):
            k = int(n * 0.25) if projection == "columns" else int(m * n * 0.25)
            assert state["exp_avg"].shape == ((m, k) if projection == "columns" else (k,))
            in_s = torch.zeros(n if projection == "columns" else m * n, dtype=torch.bool)
            in_s[state["index"]] = True
            in_s = in_s.expand(m, n) if projection == "columns" else in_s.view(m, n)
            assert int(in_s.sum()) == (m * k if projection == "columns" else k)
            torch.testing.assert_close(step_[~in_s], -LR * kappa * g.sign()[~in_s], rtol=1e-9, atol=0)
            torch.testing.assert_close(step_[in_s], adam_first[in_s], rtol=1e-9, atol=1e-15)
        else:  # svd: Adam's first step on the projected gradient, mapped back, plus signSGD on the remainder
            right = m >= n
            k = round((n if right else m) * 0.25)
            proj = state["projector"]  # (k, n) or (m, k)
            assert state["exp_avg"].shape == ((m, k) if right else (k, n))
            low = g @ proj.mT if right else proj.mT @ g  # (m, k) or (k, n)
            adam = -LR * low / (low.abs() + 1e-8)
            remainder = g - (low @ proj if right else proj @ low)  # (m, n)
            expected = (adam @ proj if right else proj @ adam) - LR * kappa * remainder.sign()
            torch.testing.assert_close(step_, expected, rtol=1e-9, atol=1e-15)
            top = torch.linalg.svdvals(g)[:k]  # P spans G's top-k singular directions
            torch.testing.assert_close(low.norm() ** 2, (top**2).sum(), rtol=1e-9, atol=0)
        # two moments on ρ = 1/4 of W (+ P, k×n or m×k, for svd) against AdamW's two full moments
        assert state_bytes(optimizer, [w]) <= (0.5 + 0.25 * (projection == "svd")) * w.numel() * w.element_size()
        assert state_bytes(optimizer, [w]) <= 0.6 * 2 * w.numel() * w.element_size()


@pytest.mark.parametrize("projection", ["columns", "block"])
def test_subspace_is_redrawn_every_t_steps_and_adam_state_reset(projection):
    t, method, model, optimizer, batches = setup(projection, 0.5, gap=2)
    w = model.get_submodule(method._targets[0]).weight
    draws = []
    for i, batch in enumerate(batches[:5]):
        step(model, optimizer, batch)
        state = optimizer.state[w]
        draws.append(state["index"].tolist() if projection == "columns"
                     else [optimizer.state[p]["active"] for p in optimizer.param_groups[0]["params"]])
        if projection == "columns" or state["active"]:
            assert state["step"] == i % 2 + 1, (i, state["step"])  # Adam's step restarts at each refresh
    assert draws[0] == draws[1] and draws[2] == draws[3], "the subspace changed between refreshes"
    assert draws[1] != draws[2] or draws[3] != draws[4], "the subspace was never redrawn"


@pytest.mark.parametrize("projection", ["svd", "randk", "columns", "block"])
def test_state_dict_round_trip_resumes_exactly(projection):
    t, method, model, optimizer, batches = setup(projection, 0.25, gap=2)
    for batch in batches[:3]:
        step(model, optimizer, batch)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors and plain values only

    resumed = copy.deepcopy(model)
    optimizer2 = method.make_optimizer(resumed, weight_decay=WD)
    optimizer2.load_state_dict(saved)
    for batch in [*batches[3:], *batches[:2]]:  # steps 4..7 cross the refreshes at steps 4 and 6
        step(model, optimizer, batch)
        step(resumed, optimizer2, batch)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name} differs after resuming"

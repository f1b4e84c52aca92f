"""ALLoRA's properties (specs/methods.md, group C): zero rows get the multiplier η, the multiplier decreases as the
row norm grows, and the gradients are scaled exactly as 1/√(‖θ_row‖² + 1/η²) says; no scaling factor, no dropout."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from methods.allora import ALLoRA, RowScaledAdamW, row_multiplier
from tests.helpers import tiny, wrapped

ETA = 10.0


def allora(extra: list[str] | None = None):
    t = tiny("allora", extra=[f"method.eta={ETA}", *(extra or [])])
    method, model = wrapped(t)
    assert isinstance(method, ALLoRA)
    return t, method, model


def randomize_some_b_rows(method: ALLoRA, model: nn.Module) -> None:
    """Non-zero values in half the rows of every B (the other half stays at its zero init)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in method.lora_layers(model).values():
            b = layer.lora_B["default"].weight  # (m, r)
            b[::2] = torch.randn(b[::2].shape, generator=g) * torch.logspace(-3, 1, b[::2].shape[0])[:, None]


def test_multiplier_is_eta_on_zero_rows_and_decreases_with_the_norm():
    norms = torch.tensor([0.0, 1e-4, 1e-2, 0.1, 0.5, 1.0, 3.0, 100.0])
    w = torch.zeros(len(norms), 5)
    w[:, 2] = norms  # row i has ℓ2 norm norms[i]
    c = row_multiplier(w, ETA)
    assert c[0] == pytest.approx(ETA, rel=1e-6)
    assert torch.all(c[1:] < c[:-1]), c  # strictly decreasing in the norm
    expected = torch.tensor([1 / math.sqrt(float(n) ** 2 + 1 / ETA**2) for n in norms])
    torch.testing.assert_close(c, expected, rtol=1e-6, atol=0)
    assert c[-1] == pytest.approx(1 / 100.0, rel=1e-4)  # ≈ 1/‖θ‖ once ‖θ‖ ≫ 1/η


def test_no_scaling_factor_and_no_dropout():
    t, method, model = allora()
    for layer in method.lora_layers(model).values():
        assert layer.scaling["default"] == 1.0
        assert isinstance(layer.lora_dropout["default"], nn.Identity)


def test_on_after_backward_scales_every_row_gradient_exactly():
    t, method, model = allora()
    randomize_some_b_rows(method, model)
    model.eval()
    model(**t.batch).loss.backward()
    raw = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    method.on_after_backward(model, step=0)
    factors = {id(w) for w in method.factor_weights(model)}
    seen_zero_rows = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if id(p) in factors:
            norms = p.detach().double().norm(dim=1)  # (rows,)
            c = 1.0 / torch.sqrt(norms**2 + 1.0 / ETA**2)  # the formula, independently of row_multiplier
            torch.testing.assert_close(p.grad.double(), raw[name].double() * c[:, None], rtol=1e-6, atol=0)
            zero = norms == 0
            seen_zero_rows += int(zero.sum())
            torch.testing.assert_close(p.grad[zero], ETA * raw[name][zero], rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.grad, raw[name]), f"{name} is not a LoRA factor and must keep its gradient"
    assert seen_zero_rows > 0


def test_update_mode_scales_each_row_of_the_adamw_step():
    torch.manual_seed(0)
    w0 = torch.randn(6, 4) * torch.tensor([0.0, 0.01, 0.1, 1.0, 3.0, 10.0])[:, None]  # (rows, cols)
    grads = [torch.randn(6, 4) for _ in range(3)]
    p, ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = RowScaledAdamW([{"params": [p], "row_eta": ETA}], lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for g in grads:
        old = p.detach().clone()
        c = 1.0 / torch.sqrt(old.pow(2).sum(dim=1) + 1.0 / ETA**2)  # (rows,)
        # what plain AdamW (same moments) would do from `old`
        with torch.no_grad():
            ref.copy_(old)
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
        torch.testing.assert_close(p.detach(), old + c[:, None] * (ref.detach() - old), rtol=1e-6, atol=1e-7)


def _step(model: nn.Module, method: ALLoRA, opt: torch.optim.Optimizer, batch: dict) -> None:
    model(**batch).loss.backward()
    method.on_after_backward(model, 0)
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("apply_to", ["gradient", "update"])
def test_optimizer_state_round_trips_and_the_next_steps_are_identical(apply_to):
    t, method, model = allora([f"method.apply_to={apply_to}"])
    model.eval()  # no dropout: the two runs are bit-identical
    batches = [t.batch, *t.calibration]
    opt = method.make_optimizer(model, weight_decay=0.01)
    assert isinstance(opt, RowScaledAdamW) == (apply_to == "update")
    for batch in batches[:2]:
        _step(model, method, opt, batch)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "adapter": method.adapter_state_dict(model)}, buffer)

    buffer.seek(0)
    saved = torch.load(buffer)
    fresh_method, fresh = wrapped(t)
    fresh.eval()
    fresh_method.load_adapter_state_dict(fresh, saved["adapter"])
    fresh_opt = fresh_method.make_optimizer(fresh, weight_decay=0.01)
    fresh_opt.load_state_dict(saved["opt"])
    for batch in batches[2:]:
        _step(model, method, opt, batch)
        _step(fresh, fresh_method, fresh_opt, batch)
    now, other = method.trainable_parameters(model), fresh_method.trainable_parameters(fresh)
    for name, p in now.items():
        assert torch.equal(p, other[name]), name

"""LaMDA's properties (specs/methods.md, group D): the model starts at the base with either A init; the SVD init
takes W0's top-r right singular vectors; the freezing schedule is the reference's k(t) = ⌊(t+1)/(η·T)⌋; frozen
columns of B never change ("exact") or only lose their gradient ("grad_mask"); the trainable count is
Σ (r² + m·r) over the adapted layers plus the head."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from bench.train import Trainer
from methods.base import head_parameter_count
from methods.lamda import LaMDA, LaMDALinear
from tests.helpers import logits, tiny, wrapped


def setup(extra: list[str] | None = None):
    t = tiny("lamda", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, LaMDA)
    return t, method, model


def cfg(steps: int) -> SimpleNamespace:
    return SimpleNamespace(max_steps=steps, grad_accum=1, warmup_ratio=0.0, weight_decay=0.1, max_grad_norm=1.0,
                           log_every=1, eval_every=0)


@pytest.mark.parametrize("a_init", ["svd", "lora"])
def test_init_equals_base(a_init: str):
    t, method, model = setup([f"method.a_init={a_init}", "method.r=8"])
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch), rtol=1e-5, atol=1e-6)
    layers = method.adapted_layers(model)
    assert all(not layer.A.requires_grad and layer.S.requires_grad and layer.B.requires_grad
               for layer in layers.values())


def test_svd_init_takes_the_top_right_singular_vectors_of_w0():
    t, method, model = setup(["method.a_init=svd", "method.r=8"])
    for name, layer in method.adapted_layers(model).items():
        w0 = t.base.get_submodule(name).weight.detach().double()
        a = layer.A.detach().double()  # (r, n)
        torch.testing.assert_close(a @ a.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
        sv = torch.linalg.svdvals(w0)
        # the row space of A captures W0's top-r energy: ‖W0·Aᵀ‖² = Σ_{i≤r} σ_i²
        torch.testing.assert_close((w0 @ a.T).norm() ** 2, (sv[:8] ** 2).sum(), rtol=1e-5, atol=0)


def test_schedule_is_the_references():
    method = LaMDA(lr=1e-3, total_steps=400)  # η = 0.3: one more column every 120 steps
    k = [method.frozen_columns(t) for t in range(400)]
    assert k[118] == 0 and k[119] == 1 and k[238] == 1 and k[239] == 2 and k[359] == 3 and k[399] == 3
    assert max(k) == 3  # ⌊1/η⌋: the reference never freezes more in one run
    short = LaMDA(lr=1e-3, total_steps=10, freeze_eta=0.1, r=4)  # a column per step (all of B from step 3 on)
    assert [short.frozen_columns(t) for t in range(6)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="method.total_steps"):
        t = tiny("lamda")
        LaMDA(lr=1e-3).prepare(copy.deepcopy(t.base), t.ctx)


@pytest.mark.parametrize("freeze", ["exact", "grad_mask"])
def test_frozen_columns_do_not_change(freeze: str):
    """T = 10, η = 0.2: k(t) = ⌊(t+1)/2⌋ = 0, 1, 1, 2, 2, 3, ... Weight decay 0.1 and Adam momentum would move a
    column whose gradient alone is zeroed: "exact" keeps it bit-identical, "grad_mask" (the reference) does not."""
    t, method, model = setup(["method.r=8", "method.total_steps=10", "method.freeze_eta=0.2",
                              f"method.freeze={freeze}"])
    trainer = Trainer(model, method, t.loader, cfg(10), torch.device("cpu"), None)
    layers = method.adapted_layers(model)
    masked_grads_zero, moved = True, False
    after_backward = method.on_after_backward

    def check(m: torch.nn.Module, step: int) -> None:
        nonlocal masked_grads_zero
        after_backward(m, step)
        k = method.frozen_columns(step)
        masked_grads_zero &= all(layer.B.grad[:, :k].abs().max() == 0 for layer in layers.values() if k)

    method.on_after_backward = check
    for step in range(8):
        before = {n: layer.B.detach().clone() for n, layer in layers.items()}
        trainer.step()
        k = method.frozen_columns(step)
        for name, layer in layers.items():
            b = layer.B.detach()
            same = torch.equal(b[:, :k], before[name][:, :k])
            if freeze == "exact":
                assert same, (step, name, k)
            moved |= not same
            assert not torch.equal(b[:, k:], before[name][:, k:]), "the unfrozen columns did not train"
    assert masked_grads_zero
    assert moved == (freeze == "grad_mask")


def test_trainable_count_is_r_squared_plus_m_r_per_layer_plus_the_head():
    t, method, model = setup(["method.r=8"])
    shapes = [tuple(t.base.get_submodule(n).weight.shape) for n in method.target_layers(t.base, t.ctx)]
    assert len(shapes) == 2 * 6 + 1  # tiny BERT: 2 blocks × (q, k, v, attn-out, intermediate, output) + pooler
    formula = sum(min(8, m, n) ** 2 + m * min(8, m, n) for m, n in shapes) + head_parameter_count(t.base, t.ctx)
    actual = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert actual == formula == method.expected_trainable(copy.deepcopy(t.base), t.ctx)
    assert all(isinstance(layer, LaMDALinear) and tuple(layer.S.shape) == (8, 8)
               for layer in method.adapted_layers(model).values())

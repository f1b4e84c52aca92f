"""FILA's property (methods/fila.py): s·B0·A0 is the row-weighted rank-r approximation D⁻¹·[D·W0]_r with
d_i = √(Σ_j I_ij) and I the forget Fisher over the retain Fisher, moved out of W0 so the model starts unchanged."""

from __future__ import annotations

import copy

import torch

from methods.fila import squared_gradients
from tests.helpers import logits, tiny


def truncated(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def prepared(importance_of):
    t = tiny("fila", extra=["method.r=2"])
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    layers = method.lora_layers(model)
    w0 = {n: l.get_base_layer().weight.detach().double().clone() for n, l in layers.items()}
    importance = {n: importance_of(w) for n, w in w0.items()}
    method.init_from_importance(model, importance)
    return t, method, model, w0, importance


def test_uniform_importance_gives_the_truncated_svd_of_w0():
    t, method, model, w0, _ = prepared(lambda w: torch.ones_like(w))
    for name, product in method.products(model).items():
        torch.testing.assert_close(product, truncated(w0[name], 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch), rtol=1e-4, atol=1e-5)


def test_rows_important_to_the_forget_set_are_approximated_best():
    g = torch.Generator().manual_seed(0)
    t, method, model, w0, importance = prepared(lambda w: torch.rand(w.shape, generator=g, dtype=torch.float64) * 10)
    for name, product in method.products(model).items():
        d = importance[name].sum(1).sqrt()  # (m,)
        expected = truncated(d[:, None] * w0[name], 2) / (d[:, None] + method.epsilon)
        torch.testing.assert_close(product, expected, rtol=1e-4, atol=1e-5)
        # the weighted error is the smallest any rank-2 matrix reaches (Eckart–Young on D·W0)
        weighted = (d[:, None] * (w0[name] - product)).norm()
        plain = (d[:, None] * (w0[name] - truncated(w0[name], 2))).norm()
        assert weighted <= plain + 1e-6
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch), rtol=1e-4, atol=1e-5)


def test_the_fisher_separates_forget_rows_from_retain_rows():
    t = tiny("fila")
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    weights = {n: l.get_base_layer().weight for n, l in method.lora_layers(model).items()}
    forget_batch, retain_batch = t.calibration[0], t.calibration[1]
    paired = {**forget_batch, **{f"retain_{k}": v for k, v in retain_batch.items()}}
    forget, retain, n_f, n_r = squared_gradients(model, weights, [paired])
    alone, none, n_alone, _ = squared_gradients(model, weights, [forget_batch])
    other, _, _, _ = squared_gradients(model, weights, [retain_batch])
    assert not none and n_alone == n_f  # a plain batch has no retain Fisher
    for name in weights:
        torch.testing.assert_close(forget[name], alone[name])
        torch.testing.assert_close(retain[name], other[name])
        assert (forget[name] - retain[name]).norm() > 1e-3 * forget[name].norm()  # two different sets of rows

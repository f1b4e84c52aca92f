"""EoRA (specs/methods.md, group E): the eigenspace compensation beats the plain SVD on the activation-weighted
residual and is exact at full rank; the pruners keep their patterns; post_train scores base / compressed, leaves the
model compensated, and merge()/delta_weights() describe that final model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from methods.base import WrapContext
from methods.compress import (CompressedLinear, check_compression, compress_weight, magnitude_prune,
                              semi_structured_prune)
from methods.eora import EoRA, eora_factors
from methods.lq_lora import QuantConfig
from tests.helpers import logits, tiny, train_steps, wrapped


def anisotropic(n: int = 48, tokens: int = 400, seed: int = 0) -> torch.Tensor:
    """Inputs X (n×N) whose covariance has eigenvalues spread over four decades in a random basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -2, n, dtype=torch.float64)  # (n,) standard deviations 1 .. 0.01
    return q @ (scales[:, None] * torch.randn(n, tokens, generator=g, dtype=torch.float64))  # (n, N)


def plain_svd(delta: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("r", [1, 4, 12])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eigenspace_residual_is_at_most_the_plain_svd_residual(r, seed):
    x = anisotropic(seed=seed)  # (n, N)
    g = torch.Generator().manual_seed(100 + seed)
    delta = torch.randn(32, 48, generator=g, dtype=torch.float64)  # (m, n)
    cov = x @ x.mT / x.shape[1]  # (n, n)
    b, a = eora_factors(delta, cov, r)
    assert b.shape == (32, r) and a.shape == (r, 48)
    eora = float(((delta - b @ a) @ x).norm())
    svd = float(((delta - plain_svd(delta, r)) @ x).norm())
    assert eora <= svd * (1 + 1e-9)
    assert eora < 0.97 * svd  # anisotropic inputs: strictly better, not a tie


def test_full_rank_recovers_delta_exactly_whatever_the_eigenvalue_floor():
    x = anisotropic(tokens=20)  # fewer tokens than n: C is singular, the floor is active
    delta = torch.randn(32, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cov = x @ x.mT / x.shape[1]
    for floor in (1e-12, 1e-6, 1e-2):
        b, a = eora_factors(delta, cov, 10_000, floor)  # capped at min(m, n) = 32
        assert b.shape[1] == 32
        torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-8)
    b, a = eora_factors(delta, torch.zeros(48, 48, dtype=torch.float64), 4)  # no data: the plain SVD
    torch.testing.assert_close(b @ a, plain_svd(delta, 4), rtol=0, atol=1e-10)


def test_pruners_keep_their_patterns():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    p = semi_structured_prune(w)
    groups, kept = w.reshape(16, 8, 4), p.reshape(16, 8, 4)
    assert torch.all((kept != 0).sum(-1) == 2)  # exactly 2 of every 4 survive (random weights have no zeros)
    smallest_kept = torch.where(kept != 0, groups.abs(), torch.inf).amin(-1)
    largest_dropped = torch.where(kept == 0, groups.abs(), -torch.inf).amax(-1)
    assert torch.all(smallest_kept >= largest_dropped)  # ... and they are the two largest
    assert torch.equal(p[p != 0], w[p != 0])
    m = magnitude_prune(w, 0.3)
    assert int((m == 0).sum()) == round(0.3 * w.numel())
    assert float(w[m == 0].abs().max()) <= float(w[m != 0].abs().min())
    q = compress_weight(w, ["2:4", "nf4"], 0.5, QuantConfig())
    assert torch.all(q[p == 0] == 0) and not torch.equal(q[p != 0], w[p != 0])  # zeros stay zero, the rest rounded
    with pytest.raises(ValueError, match="in_features divisible by 4"):
        semi_structured_prune(torch.randn(4, 6))


@pytest.mark.parametrize("bad", [["nf4", "2:4"], ["2:4", "magnitude"], ["gptq"], []])
def test_bad_compression_names_the_key(bad):
    with pytest.raises(ValueError, match="method.compression"):
        check_compression(bad, 0.5)
    with pytest.raises(ValueError, match="method.sparsity"):
        check_compression(["magnitude"], 1.5)


def run_context(t) -> WrapContext:
    """What bench/run.py hands post_train: the task's evaluation, training batches, the task loss."""
    rows = t.task.examples("eval")[:32]
    loader = DataLoader(rows, batch_size=16, collate_fn=t.task.eval_collate_fn(t.tokenizer))
    return WrapContext(head_modules=t.ctx.head_modules, seed=0, main_metric=t.task.main_metric,
                       evaluate=lambda m: t.task.evaluate(m, loader, torch.device("cpu"), None),
                       train_batches=lambda: iter(t.loader), loss_fn=lambda m, b: m(**b).loss, max_steps=3)


def trained(extra: list[str]):
    t = tiny("eora", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, EoRA)
    train_steps(model, method, t.loader, steps=3)
    return t, method, model


def check_final_state(t, method, model) -> None:
    """merge() and delta_weights() describe the model as it now computes."""
    deltas = method.delta_weights(model)
    assert set(deltas) == set(method.target_layers(t.base, t.ctx))
    merged = method.merge(copy.deepcopy(model))
    assert not any(isinstance(m, CompressedLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, t.batch), logits(model, t.batch), rtol=1e-4, atol=1e-5)
    for name, d in deltas.items():
        from_merge = merged.get_submodule(name).weight.detach().double() - method._w0[name].double()
        torch.testing.assert_close(d.double(), from_merge, rtol=0, atol=1e-5)


def test_post_train_scores_each_stage_and_leaves_the_model_compensated():
    t, method, model = trained(["method.eora_rank=4"])
    fine_tuned = logits(model, t.batch)
    ctx = run_context(t)
    before = ctx.evaluate(model)
    out = method.post_train(model, ctx)
    metric = t.task.main_metric
    assert {f"base/{metric}", f"compressed/{metric}", "eora/output_error_compressed",
            "eora/output_error_compensated", "compression/zero_fraction"} <= set(out)
    assert out[f"base/{metric}"] == before[metric]  # scored before compression
    assert out["compression/zero_fraction"] >= 0.5  # 2:4
    assert out["eora/output_error_compensated"] < out["eora/output_error_compressed"]
    layers = method.target_modules_now(model)
    assert all(isinstance(m, CompressedLinear) and m.compensate and m.rank == 4 for m in layers.values())
    compensated = logits(model, t.batch)
    for m in layers.values():
        m.compensate = False
    compressed = logits(model, t.batch)
    assert out[f"compressed/{metric}"] == ctx.evaluate(model)[metric]
    for m in layers.values():
        m.compensate = True
    # the compensation moves the outputs back toward the fine-tuned model's
    assert (compensated - fine_tuned).norm() < (compressed - fine_tuned).norm()
    check_final_state(t, method, model)


@pytest.mark.parametrize("compression", ["[nf4]", "[magnitude]", "['2:4',nf4]"])
def test_full_rank_compensation_restores_the_fine_tuned_model(compression):
    t, method, model = trained([f"method.compression={compression}", "method.eora_rank=100000"])
    fine_tuned = logits(model, t.batch)
    weights = method.fine_tuned_weights(model)
    method.post_train(model, WrapContext(head_modules=t.ctx.head_modules))  # no evaluate: the calibrate batches
    torch.testing.assert_close(logits(model, t.batch), fine_tuned, rtol=1e-4, atol=1e-4)
    for name, d in method.delta_weights(model).items():
        torch.testing.assert_close(d.double() + method._w0[name].double(), weights[name], rtol=0, atol=1e-4)
    check_final_state(t, method, model)

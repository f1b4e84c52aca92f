"""WeLore (specs/methods.md, group E): the parameter count after compression hits the target that τ and min_ratio
define on the fine-tuned spectra; an exactly low-rank matrix is compressed losslessly; compensation changes only
the low-rank components; post_train scores base / compressed and leaves a consistent, compensated model."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from methods.compress import CompressedLinear
from methods.welore import WeLore, welore_split
from tests.helpers import logits, tiny, train_steps, wrapped
from tests.methods.test_eora import check_final_state, run_context

MIXED = ["method.tau=0.5", "method.min_ratio=0.59"]  # on the tiny model: some matrices become LRCs, some do not


def trained(extra: list[str]):
    t = tiny("welore", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, WeLore)
    train_steps(model, method, t.loader, steps=3)
    return t, method, model


def target_params(weights: dict[str, torch.Tensor], tau: float, min_ratio: float) -> int:
    """The count τ and min_ratio define, computed with numpy from the fine-tuned weights: k(m+n) for a matrix whose
    normalised-spectrum rank reduction exceeds min_ratio, m·n otherwise."""
    total = 0
    for w in weights.values():
        s = np.linalg.svd(w.cpu().numpy(), compute_uv=False)
        pruned = int(np.sum((s - s.min()) / (s.max() - s.min()) < tau))
        m, n = w.shape
        total += (len(s) - pruned) * (m + n) if pruned / len(s) > min_ratio else m * n
    return total


def test_exactly_low_rank_matrix_is_compressed_losslessly():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    w = (u[:, :4] * torch.tensor([4.0, 3.0, 2.5, 2.0], dtype=torch.float64)) @ v[:, :4].mT  # (48, 32), rank 4
    split = welore_split(w, tau=0.175, min_ratio=0.4999)
    assert split.is_lrc and (split.rank, split.pruned) == (32, 28)
    assert split.up.shape == (48, 4) and split.down.shape == (4, 32)
    torch.testing.assert_close(split.up @ split.down, w, rtol=0, atol=1e-12)
    # the factors are the reference's balanced split U_k√S_k, √S_kV_kᵀ: equal column / row norms √σ_i
    torch.testing.assert_close(split.up.norm(dim=0), split.down.norm(dim=1), rtol=0, atol=1e-12)


def test_normalised_threshold_and_min_ratio():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    s = torch.tensor([11.0, 9, 7, 5, 3.0, 2.9, 2.5, 2, 1.5, 1], dtype=torch.float64)  # normalised: 1, .8, .6, .4, ...
    w = (u * s) @ v.mT
    assert welore_split(w, 0.25, 0.4999).pruned == 6  # .19, .15, .1, .05, 0 and .2 (< .25)
    assert not welore_split(w, 0.25, 0.6).is_lrc  # 6/10 is not > 0.6: kept whole
    assert welore_split(w, 0.25, 0.59).up.shape == (10, 4)
    flat = welore_split(torch.eye(6, dtype=torch.float64), 0.5, 0.0)
    assert flat.pruned == 0 and not flat.is_lrc  # a flat spectrum prunes nothing


@pytest.mark.parametrize("extra", [MIXED, ["method.tau=0.7"], []])
def test_parameter_count_after_compression_hits_the_target(extra):
    t, method, model = trained(extra)
    weights = method.fine_tuned_weights(model)
    lrcs = method.compress(model)
    modules = method.target_modules_now(model)
    stored = sum(p.numel() for m in modules.values() for n, p in m.named_parameters() if n != "bias")
    assert stored == target_params(weights, method.tau, method.min_ratio)
    assert len(lrcs) == sum(1 for *_, lrc in method.splits.values() if lrc)
    if extra == MIXED:
        assert 0 < len(lrcs) < len(modules)


def test_compensation_changes_only_the_low_rank_components():
    t, method, model = trained(MIXED + ["method.compensation_steps=10"])
    lrcs = method.compress(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = method.compensate(model, lrcs, dataclasses.replace(run_context(t), max_steps=None))
    assert len(losses) == 10
    lrc_params = {id(p) for m in lrcs for p in (m.A, m.B)}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(id(dict(model.named_parameters())[n]) in lrc_params for n in changed)
    assert len(changed) == 2 * len(lrcs)  # every LRC factor moved
    # the flags come back: the LRC factors and the head are the trainable set afterwards
    trainable = method.trainable_parameters(model)
    assert {id(p) for p in trainable.values()} >= lrc_params
    assert any("classifier" in n for n in trainable)


def test_post_train_scores_each_stage_and_leaves_the_model_compensated():
    t, method, model = trained(MIXED + ["method.compensation_steps=5"])
    ctx = run_context(t)
    before = ctx.evaluate(model)
    out = method.post_train(model, ctx)
    metric = t.task.main_metric
    assert out[f"base/{metric}"] == before[metric]
    assert {f"compressed/{metric}", "welore/params_after", "welore/compensation_loss_last"} <= set(out)
    assert out["welore/params_after"] < out["welore/params_before"]
    assert out["welore/compensation_steps"] == ctx.max_steps == 3  # capped at the run's train.max_steps
    assert all(isinstance(m, CompressedLinear) for m in method.target_modules_now(model).values())
    check_final_state(t, method, model)


def test_no_compression_when_nothing_qualifies_is_the_fine_tuned_model():
    t, method, model = trained(["method.tau=0.0"])  # nothing is below 0: every matrix stays whole
    fine_tuned = logits(model, t.batch)
    out = method.post_train(model, copy.copy(t.ctx))
    assert out["welore/lrc_layers"] == 0 and out["welore/param_reduction"] == 0
    torch.testing.assert_close(logits(model, t.batch), fine_tuned, rtol=1e-5, atol=1e-5)
    check_final_state(t, method, model)


@pytest.mark.parametrize("key,value", [("tau", 1.5), ("min_ratio", 1.0), ("compensation_steps", -1)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"method.{key}"):
        WeLore(lr=1e-3, **{key: value})

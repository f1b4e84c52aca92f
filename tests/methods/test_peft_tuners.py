"""Properties of the PEFT-backed tuners beyond the shared checklist (specs/methods.md, group A)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny, train_steps, wrapped


def test_vera_trains_only_the_scaling_vectors_and_never_saves_the_projections():
    t = tiny("vera", extra=["method.r=16"])
    method, model = wrapped(t)
    names = method.adapter_state_dict(model)
    assert names and all("vera_lambda" in n or "classifier" in n for n in names)
    assert not any("vera_A" in n or "vera_B" in n for n in names)


def test_randlora_update_can_exceed_the_basis_rank():
    t = tiny("randlora", extra=["method.r=4", "method.alpha=64"])
    method, model = wrapped(t)
    train_steps(model, method, t.loader, steps=3)
    ranks = [int(torch.linalg.matrix_rank(d.double(), rtol=1e-5)) for d in method.delta_weights(model).values()]
    assert max(ranks) > 4, ranks


def test_bone_delta_tiles_the_block_over_the_input_features():
    t = tiny("bone", extra=["method.r=8"])
    method, model = wrapped(t)
    train_steps(model, method, t.loader, steps=3)
    deltas = method.delta_weights(model)
    for name, layer in method.tuner_layers(model).items():
        block = layer.miss_block["default"].detach().t()  # (m, r)
        d = deltas[name]  # (m, n)
        assert block.abs().max() > 0
        for j in range(d.shape[1] // 8):
            torch.testing.assert_close(d[:, 8 * j:8 * j + 8], block, rtol=1e-5, atol=1e-6)


def test_bone_rejects_a_block_size_that_does_not_divide_the_features():
    t = tiny("bone", extra=["method.r=5"])
    with pytest.raises(ValueError, match="r=5 must divide"):
        wrapped(t)

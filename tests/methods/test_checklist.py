"""The shared checklist every method passes, parametrised over conf/method/*.yaml: a new YAML is tested the day
it lands. Method-specific properties live in tests/methods/test_<family>.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import METHODS, logits, tiny, train_steps, wrapped


@pytest.fixture(params=METHODS)
def t(request):
    return tiny(request.param)



def rebuild(method, model, t) -> None:
    """The model a method scores and exports: after post_train where the method rebuilds it there (LoRAM)."""
    if getattr(method, "rebuilds_in_post_train", False):
        method.post_train(model, t.ctx)


def test_init_equals_base(t):
    method, model = wrapped(t)
    if not getattr(method, "init_equals_base", True):
        pytest.skip(f"{type(method).__name__}'s spec does not start at the base model")
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch), rtol=1e-4, atol=1e-5)


def test_trainable_count_matches_formula(t):
    method, model = wrapped(t)
    actual = sum(p.numel() for p in method.trainable_parameters(model).values())
    assert actual == method.expected_trainable(copy.deepcopy(t.base), t.ctx)
    assert actual == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_training_changes_delta_and_merged_equals_unmerged(t):
    method, model = wrapped(t)
    if not getattr(method, "mergeable", True):
        pytest.skip(f"{type(method).__name__} is not mergeable (input-dependent update)")
    deltas0 = method.delta_weights(model)
    assert set(deltas0) == set(method.target_layers(t.base, t.ctx))
    train_steps(model, method, t.loader, steps=3)
    rebuild(method, model, t)
    deltas = method.delta_weights(model)
    assert any(d.abs().max() > 0 for d in deltas.values()), "training left every ΔW at zero"
    for name, d in deltas.items():
        assert d.shape == t.base.get_submodule(name).weight.shape
    merged = method.merge(copy.deepcopy(model))
    assert not any("lora" in n for n, _ in merged.named_modules()), "merge left adapter modules behind"
    torch.testing.assert_close(logits(merged, t.batch), logits(model, t.batch), rtol=1e-4, atol=1e-5)


def test_frozen_weights_bit_identical_after_training(t):
    method, model = wrapped(t)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, method, t.loader, steps=3)
    now = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(now[name], before), f"frozen {name} changed"


def test_save_load_round_trip(t, tmp_path):
    method, model = wrapped(t)
    train_steps(model, method, t.loader, steps=3)
    save_file(method.adapter_state_dict(model), str(tmp_path / "adapter.safetensors"))
    torch.save(method.state_dict(), tmp_path / "method.pt")

    fresh_method, fresh = wrapped(t)  # same seed, same base: only the saved state differs
    fresh_method.load_adapter_state_dict(fresh, load_file(str(tmp_path / "adapter.safetensors")))
    fresh_method.load_state_dict(torch.load(tmp_path / "method.pt"))
    torch.testing.assert_close(logits(fresh, t.batch), logits(model, t.batch), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits(fresh, t.batch), logits(t.base, t.batch)), "the round trip restored nothing"


def test_delta_weights_match_the_merged_model(t):
    """The closed-form ΔW a method reports equals what merging actually adds to W0 (up to fp32 rounding)."""
    method, model = wrapped(t)
    if not getattr(method, "mergeable", True):
        pytest.skip(f"{type(method).__name__} is not mergeable (input-dependent update)")
    train_steps(model, method, t.loader, steps=3)
    rebuild(method, model, t)
    deltas = method.delta_weights(model)
    merged = method.merge(copy.deepcopy(model))
    for name, d in deltas.items():
        from_merge = merged.get_submodule(name).weight.detach().double() - method._w0[name].double()
        torch.testing.assert_close(d.double(), from_merge, rtol=0, atol=1e-6)

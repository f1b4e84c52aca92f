"""DiffoRA (specs/methods.md, group D): the search raises the gate of a module whose adaptation lowers the
validation loss above that of a module whose adaptation only fits noise; the kept set has the configured size;
dropped modules get no gradient after the switch; the wrapped model is the base model; the switch keeps the
kept modules' searched contribution (weight sharing) or restores the base (inherit_weights=false)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import WrapContext
from methods.diffora import DiffoRA, positions
from tests.helpers import logits, tiny, train_steps, wrapped


class Toy(nn.Module):
    """pred = useful(x) + useless(z): the targets need a low-rank change of `useful` only; `useless` is already right,
    so any change of it just fits the training batches' noise."""

    def __init__(self) -> None:
        super().__init__()
        self.useful, self.useless = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=F.mse_loss(self.useful(x) + self.useless(z), y))


def toy_data(model: Toy, batches: int = 20, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(8, 2, generator=g) @ torch.randn(2, 8, generator=g)  # (8, 8) rank-2 change of `useful`
    out = []
    with torch.no_grad():
        for _ in range(batches):
            x, z = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
            y = model.useful(x) + x @ shift.T + model.useless(z) + 0.5 * torch.randn(16, 8, generator=g)
            out.append({"x": x, "z": z, "y": y})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_raises_the_gate_of_the_module_whose_adaptation_helps(seed):
    torch.manual_seed(seed)
    base = Toy()
    data = toy_data(base, seed=seed)
    method = DiffoRA(lr=1e-2, target_modules=["useful", "useless"], r=2, alpha=2, search_steps=150, keep_ratio=0.5,
                     arch_lr=5e-2)
    ctx = WrapContext(seed=seed, train_batches=lambda: iter(data))
    model = method.prepare(copy.deepcopy(base), ctx)
    method.calibrate(model, [], lambda m, b: m(**b).loss)
    useful, useless = method.scores["useful"], method.scores["useless"]
    assert useful > 0.5 > useless, method.scores  # from γ = ½: one gate opened, the other closed
    assert method.kept == ["useful"]
    first, last = method.search_losses[0][1], method.search_losses[-1][1]
    assert last < first  # the validation loss fell during the search


def test_split_alternates_within_each_pass():
    data = list(range(5))  # an odd pass length: the parities must not swap from one pass to the next
    train, val = positions(lambda: iter(data), 0), positions(lambda: iter(data), 1)
    assert [next(train) for _ in range(6)] == [0, 2, 4, 0, 2, 4]
    assert [next(val) for _ in range(4)] == [1, 3, 1, 3]
    calls = []
    single = positions(lambda: iter([7]), 1, on_single=lambda: calls.append(1))  # one batch: it is both halves
    assert [next(single) for _ in range(3)] == [7, 7, 7] and calls
    with pytest.raises(ValueError, match="no training batches"):
        next(positions(lambda: iter([]), 0))


def diffora(extra: list[str] | None = None):
    t = tiny("diffora", extra=["method.search_steps=4", *(extra or [])])
    method = t.method()
    assert isinstance(method, DiffoRA)
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    return t, method, model


def test_wrapped_model_is_the_base_model_and_training_needs_the_search():
    t, method, model = diffora()
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="calibrate"):
        method.make_optimizer(model)


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5, 1.0])
def test_kept_set_has_the_configured_size(keep_ratio):
    t, method, model = diffora([f"method.keep_ratio={keep_ratio}"])
    method.calibrate(model, iter(t.calibration), lambda m, b: m(**b).loss)
    layers = method.lora_layers(model)
    assert len(method.kept) == max(1, round(keep_ratio * len(layers)))
    enabled = [n for n, layer in layers.items() if not layer.disable_adapters]
    assert enabled == method.kept
    assert min(method.scores[n] for n in method.kept) >= max(
        [method.scores[n] for n in layers if n not in method.kept], default=0.0)  # the top modules by σ(α)
    actual = sum(p.numel() for p in method.trainable_parameters(model).values())
    assert actual == method.expected_trainable(copy.deepcopy(t.base), t.ctx)


def test_dropped_modules_get_no_gradient_and_no_delta_after_the_switch():
    t, method, model = diffora(["method.keep_ratio=0.25"])
    method.calibrate(model, iter(t.calibration), lambda m, b: m(**b).loss)
    model.train()
    model(**t.batch).loss.backward()
    deltas = method.delta_weights(model)
    for name, layer in method.lora_layers(model).items():
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        if name in method.kept:
            assert all(p.requires_grad and p.grad is not None for p in params)
            assert deltas[name].abs().max() > 0  # weight sharing: the searched factors carry over
        else:
            assert all(not p.requires_grad and p.grad is None for p in params)
            assert torch.all(deltas[name] == 0)
    # and training leaves them at zero
    train_steps(model, method, t.loader, steps=2)
    for name, d in method.delta_weights(model).items():
        if name not in method.kept:
            assert torch.all(d == 0)


def test_switch_keeps_the_kept_contribution_or_restores_the_base():
    t, method, model = diffora(["method.keep_ratio=1.0"])  # nothing dropped: the switch only folds the gates
    method.calibrate(model, iter(t.calibration), lambda m, b: m(**b).loss)
    assert method.kept == list(method.lora_layers(model))
    after = logits(model, t.batch)
    # B ← σ(α)·B: un-folding the gates and gating the branch again (the searched model) computes the same function
    with torch.no_grad():
        for name, layer in method.lora_layers(model).items():
            layer.lora_B["default"].weight.div_(method.scores[name])
    hooks = [layer.lora_B["default"].register_forward_hook(lambda mod, i, o, s=method.scores[name]: o * s)
             for name, layer in method.lora_layers(model).items()]
    torch.testing.assert_close(logits(model, t.batch), after, rtol=1e-4, atol=1e-5)
    for h in hooks:
        h.remove()
    assert not torch.allclose(after, logits(t.base, t.batch))  # the searched weights were kept

    t, method, model = diffora(["method.inherit_weights=false"])
    assert method.init_equals_base
    method.calibrate(model, iter(t.calibration), lambda m, b: m(**b).loss)
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch), rtol=1e-4, atol=1e-5)


def test_selection_is_reproducible_and_a_checkpoint_restores_its_own():
    t, method, model = diffora(["method.keep_ratio=0.25"])
    method.calibrate(model, iter(t.calibration), lambda m, b: m(**b).loss)
    other, model2 = wrapped(t)  # a fresh wrap and search with the same seed and batches
    assert other.kept == method.kept and other.scores == method.scores
    # a checkpoint taken with another selection: load_checkpoint loads the method state, then the weights
    state = {"kept": [n for n in method.scores if n not in method.kept][:3], "scores": method.scores}
    saver, model3 = wrapped(t)
    saver.load_state_dict(state)
    saver.apply_mask(model3)
    adapter = saver.adapter_state_dict(model3)
    other.load_state_dict(state)
    other.load_adapter_state_dict(model2, adapter)
    enabled = [n for n, layer in other.lora_layers(model2).items() if not layer.disable_adapters]
    assert enabled == state["kept"]
    assert set(other.trainable_parameters(model2)) == set(adapter)


@pytest.mark.parametrize("key,value", [("search_steps", 0), ("keep_ratio", 0.0), ("arch_lr", 0.0), ("init", "pissa")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"method.{key}"):
        DiffoRA(lr=1e-3, **{key: value})

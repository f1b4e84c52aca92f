"""SLTrain's properties (arXiv 2406.02214): the sparse support is fixed through training and nothing outside it
moves except the low-rank part; the trainable count is r(m+n) + ⌊δmn⌋ per layer; the from-scratch mode has no W0
and pretrains a random model."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.run import run
from methods.sltrain import SLTrain, SLTrainLinear, support_size
from tests.helpers import compose_cfg, logits, tiny, train_steps, wrapped


def _sltrain(extra: list[str] | None = None):
    t = tiny("sltrain", extra=["method.lr=5e-3", *(extra or [])])
    method, model = wrapped(t)
    assert isinstance(method, SLTrain)
    return t, method, model


def test_support_is_fixed_and_only_support_and_low_rank_move():
    t, method, model = _sltrain()
    layers = method.adapted_layers(model)
    before = {n: layer.index.clone() for n, layer in layers.items()}
    train_steps(model, method, t.loader, steps=4)
    for name, layer in method.adapted_layers(model).items():
        assert torch.equal(layer.index, before[name]), f"{name}: the support changed during training"
        layer64 = copy.deepcopy(layer).double()  # float64: the subtraction below leaves only rounding (≈1e-17)
        w0 = t.base.get_submodule(name).weight.detach().double()
        low_rank = layer64.scaling * (layer64.lora_B @ layer64.lora_A)
        residual = (layer64.weight() - w0 - low_rank).detach().reshape(-1)  # = S: zero off the support
        off = torch.ones(w0.numel(), dtype=torch.bool)
        off[layer.index] = False
        assert residual[off].abs().max() < 1e-12, f"{name}: W' − W0 − sBA is non-zero off the support"
        assert residual[layer.index].abs().max() > 1e-6, f"{name}: S did not train"
        assert layer.lora_B.detach().abs().max() > 0, f"{name}: B did not train"


def test_support_size_is_uniform_without_replacement_and_rebuilt_by_the_seed():
    t, method, model = _sltrain(["method.density=0.05"])
    layers = method.adapted_layers(model)
    for name, layer in layers.items():
        m, n = layer.out_features, layer.in_features
        assert layer.index.numel() == int(0.05 * m * n) == support_size(m, n, 0.05)
        assert layer.index.unique().numel() == layer.index.numel()  # no position twice
        assert int(layer.index.min()) >= 0 and int(layer.index.max()) < m * n
    again_method, again = wrapped(t)
    for name, layer in again_method.adapted_layers(again).items():
        assert torch.equal(layer.index, layers[name].index)  # same seed, same layer: the same Ω
    indices = [tuple(layer.index.tolist()) for layer in layers.values()]
    assert len(set(indices)) == len(indices), "two layers drew the same support"


def test_trainable_count_is_r_m_plus_n_plus_delta_mn():
    t, method, model = _sltrain()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in t.base.classifier.parameters())
    shapes = [(layer.out_features, layer.in_features) for layer in method.adapted_layers(model).values()]
    assert shapes
    formula = sum(8 * (m + n) + int(0.03 * m * n) for m, n in shapes)  # r=8, δ=0.03 (conf/method/sltrain.yaml)
    assert trainable == formula + head


def test_from_scratch_drops_w0_and_starts_at_sba_plus_s():
    t, method, model = _sltrain(["method.from_scratch=true"])
    assert not method.init_equals_base
    for name, layer in method.adapted_layers(model).items():
        assert isinstance(layer, SLTrainLinear) and layer.base.weight is None  # no W0 held
        bound = 1 / layer.in_features ** 0.5
        assert 0 < layer.values.detach().abs().max() <= bound  # the reference's U(±1/√n) on Ω
        assert torch.equal(layer.weight(), layer.sparse())  # B = 0: W = S at init
        assert layer.base.bias is None or layer.base.bias.requires_grad
    # everything outside the target weights trains, the embeddings included
    assert all(p.requires_grad for n, p in model.named_parameters() if "embeddings" in n)
    assert not torch.allclose(logits(model, t.batch), logits(t.base, t.batch))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == method.expected_trainable(copy.deepcopy(t.base), t.ctx)
    merged = method.merge(copy.deepcopy(model))
    torch.testing.assert_close(logits(merged, t.batch), logits(model, t.batch), rtol=1e-4, atol=1e-5)


def test_from_scratch_pretrains_a_random_language_model(tmp_path):
    """The paper's setting in miniature: a random Llama, W = sBA + S in every target layer, loss falls."""
    cfg = compose_cfg(["method=sltrain", "method.from_scratch=true", "method.lr=3e-3", "task=gsm8k",
                       "model=tiny_llama", "+experiment=smoke", f"results_dir={tmp_path}", "record.save_delta=false",
                       "train.max_steps=30", "train.log_every=5", "task.max_train_samples=256",
                       "task.max_new_tokens=4", "task.max_eval_samples=4", "task.max_length=64",
                       "task.probe_samples=8"])
    record = run(cfg)
    assert record["status"] == "completed", record["error"]
    curve = [point["loss"] for point in record["curve"]]
    assert curve[-1] < 0.8 * curve[0], f"pretraining did not lower the loss: {curve}"


def test_bad_density_names_the_key():
    with pytest.raises(ValueError, match="density must be in"):
        SLTrain(lr=1e-3, density=0.0)

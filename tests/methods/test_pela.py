"""PELA's properties (arXiv 2310.10700): the rank formula keeps 1/c of the entries; before distillation the compact
layer is the truncated SVD of W0 (the best rank-k approximation); distillation lowers its loss and moves only the
factors; W0 is gone afterwards; the max-norm term is (‖UV − W0‖_∞ − ε)²; the record holds the compact size."""

from __future__ import annotations

import copy

import pytest
import torch

from methods.pela import PELA, PELALinear, compact_rank
from tests.helpers import tiny, wrapped


def pela(extra: list[str] | None = None):
    t = tiny("pela", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, PELA)
    return t, method, model


def layers(method: PELA, model: torch.nn.Module) -> dict[str, PELALinear]:
    return method.layers(model)


@pytest.mark.parametrize("m,n,c", [(384, 384, 2.0), (1536, 384, 2.0), (384, 384, 3.0), (8, 4, 1.5)])
def test_compact_rank_keeps_at_most_one_cth_of_the_entries(m, n, c):
    k = compact_rank(m, n, c)
    assert k * (m + n) <= m * n / c < (k + 1) * (m + n)


def test_before_distillation_the_compact_layer_is_the_truncated_svd():
    t, method, model = pela(["method.distill_steps=0"])
    for name, layer in layers(method, model).items():
        w0 = method._w0[name].double()
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        best = (u[:, : layer.k] * s[: layer.k]) @ vh[: layer.k]  # Eckart–Young: the best rank-k approximation
        torch.testing.assert_close(layer.compact().detach().double(), best, rtol=1e-4, atol=1e-5)
        assert layer.base.weight is None  # W0 is dropped once calibrate is done
    assert method.stats["pela_relative_error"] > 0


def test_distillation_lowers_its_loss_and_moves_only_the_factors():
    t, method, model = pela(["method.distill_steps=0"])
    distilled_t, distilled, distilled_model = pela(["method.distill_steps=30", "method.distill_lr=1e-3"])
    s = distilled.stats
    assert s["pela_distill_loss_last"] < s["pela_distill_loss_first"]
    for name, layer in layers(distilled, distilled_model).items():
        assert not torch.allclose(layer.up, layers(method, model)[name].up)  # the factors moved ...
        assert torch.equal(layer.bias(), layers(method, model)[name].bias())  # ... the biases did not
        assert torch.all(layer.lora_B == 0)  # the LoRA starts at zero on the distilled model
    assert not any(p.requires_grad for layer in layers(distilled, distilled_model).values()
                   for p in (layer.up, layer.down))  # frozen again for finetune: lora


def test_the_max_norm_term_is_the_squared_gap_to_eps():
    t = tiny("pela", extra=["method.distill_steps=0", "method.feature_weight=0", "method.norm_eps=0.01"])
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx)  # not calibrated: W0 is still there
    inputs = {k: v for k, v in t.batch.items() if k != "labels"}
    loss, parts = method.distillation_loss(model, inputs)
    gaps = [float((layer.compact() - layer.base.weight).abs().max()) - 0.01 for layer in layers(method, model).values()]
    assert parts["norm"] == pytest.approx(sum(g * g for g in gaps) / len(gaps), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(parts["norm"], rel=1e-5)  # α = 0, β = 0, γ = 1


def test_full_fine_tuning_of_the_compact_model_trains_the_factors():
    t, method, model = pela(["method.finetune=full", "method.distill_steps=0"])
    trainable = method.trainable_parameters(model)
    assert any(n.endswith(".up") for n in trainable) and not any("lora_" in n for n in trainable)


def test_the_record_has_the_compact_size():
    t, method, model = pela(["method.distill_steps=0"])
    out = method.post_train(model, t.ctx)
    expected = sum(layer.k * (layer.in_features + layer.out_features) for layer in layers(method, model).values())
    assert out["pela_compact_params"] == expected
    assert 0 < out["pela_kept_fraction"] <= 0.5  # compress_ratio 2


@pytest.mark.parametrize("bad,match", [("method.compress_ratio=1.0", "compress_ratio"),
                                       ("method.finetune=adapter", "finetune")])
def test_bad_settings_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny("pela", extra=[bad]).method()

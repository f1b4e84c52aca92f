"""Distribution shift (tasks/shift.py): CIFAR-10-C corruptions, α-BN and LAME, and a shifted run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bench.run import run
from tasks.shift import SEVERITIES, alpha_bn, corrupt, lame
from tests.helpers import compose_cfg


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((32, 32, 3))


@pytest.mark.parametrize("corruption", sorted(SEVERITIES))
def test_corruptions_are_seeded_stay_in_range_and_grow_with_severity(corruption):
    x = image()
    a = corrupt(x, corruption, 3, np.random.default_rng([1, 2]))
    assert np.array_equal(a, corrupt(x, corruption, 3, np.random.default_rng([1, 2])))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    change = [np.abs(corrupt(x, corruption, s, np.random.default_rng(0)) - x).mean() for s in (1, 3, 5)]
    assert change[0] < change[1] < change[2]


def test_corruptions_do_what_their_names_say():
    x = image()
    hit = corrupt(x, "impulse_noise", 5, np.random.default_rng(0)) != x
    assert abs(hit.mean() - 0.07) < 0.01  # 7% of values salted or peppered
    flat = np.full((32, 32, 3), 0.3)
    assert np.allclose(corrupt(flat, "gaussian_blur", 5, np.random.default_rng(0)), flat)  # a blur keeps a flat image
    low = corrupt(x, "contrast", 5, np.random.default_rng(0))
    assert np.allclose(low.mean(axis=(0, 1)), x.mean(axis=(0, 1))) and low.std() < 0.2 * x.std()


def test_alpha_bn_mixes_source_and_batch_statistics_and_then_restores_the_layer():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(2.0)
    bn.running_var.fill_(4.0)
    model = nn.Sequential(bn)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    source = model(x)
    with alpha_bn(model, 1.0) as changed:
        assert changed == 1 and torch.allclose(model(x), source, atol=1e-6)
    with alpha_bn(model, 0.0):
        batch = model(x)
    expected = (x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps).sqrt()
    assert torch.allclose(batch, expected, atol=1e-5)
    assert torch.allclose(model(x), source) and torch.equal(bn.running_mean, torch.full((3,), 2.0))


def test_lame_corrects_a_point_its_neighbours_disagree_with():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    features = torch.cat([centres[0] + 0.1 * torch.randn(6, 2), centres[1] + 0.1 * torch.randn(6, 2)])  # (12, 2)
    probs = torch.tensor([[0.8, 0.2]] * 6 + [[0.2, 0.8]] * 6)
    probs[0] = torch.tensor([0.4, 0.6])  # a point of cluster 0 the model leans the wrong way on
    z = lame(probs, features, knn=3)
    assert torch.allclose(z.sum(1), torch.ones(12)) and z[0].argmax() == 0
    assert (z[:6].argmax(1) == 0).all() and (z[6:].argmax(1) == 1).all()
    assert torch.equal(lame(probs[:1], features[:1]), probs[:1])  # one image has no neighbour: unchanged


SMOKE = ["task=vision/cifar10_shift", "+experiment=smoke", "train.max_steps=2", "task.max_eval_samples=16",
         "task.corruptions=[gaussian_noise,contrast]", "task.severities=[5]", "train.eval_batch_size=8"]


def test_a_shifted_run_scores_clean_corrupted_and_adapted_sets(tmp_path):
    record = run(compose_cfg(["method=lora", "model=efficientnet_lite0", f"results_dir={tmp_path}", *SMOKE]))
    assert record["status"] == "completed", record["error"]
    m = record["metrics"]
    assert record["main_metric"] == "shift_accuracy"
    assert m["shift_accuracy"] == pytest.approx((m["shift/gaussian_noise/5"] + m["shift/contrast/5"]) / 2)
    for adaptation in ("alpha_bn", "lame"):
        assert 0 <= m[f"shift_accuracy/{adaptation}"] <= 1 and f"shift/contrast/5/{adaptation}" in m
    assert set(m) <= set(record["higher_is_better"])
    assert "CIFAR-10-C" in record["eval_note"]


def test_a_model_without_batchnorm_skips_alpha_bn_with_a_warning(tmp_path, caplog):
    record = run(compose_cfg(["method=lora", "model=tiny_vit", f"results_dir={tmp_path}", *SMOKE]))
    assert record["status"] == "completed", record["error"]
    assert "shift_accuracy/lame" in record["metrics"] and "shift_accuracy/alpha_bn" not in record["metrics"]
    assert "has none (a ViT normalises with LayerNorm)" in caplog.text


def test_bad_settings_name_the_key():
    from hydra.utils import instantiate

    with pytest.raises(Exception, match="unknown task.corruptions"):
        instantiate(compose_cfg(["task=vision/cifar10_shift", "task.corruptions=[fog]"]).task)
    with pytest.raises(Exception, match="task.severities must be levels 1..5"):
        instantiate(compose_cfg(["task=vision/cifar10_shift", "task.severities=[6]"]).task)

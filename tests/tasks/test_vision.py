"""Image classification: the offline CIFAR-10 folder, the hub source (mocked `datasets`), transforms, the image
models (EfficientNet-Lite0 offline, a ViT from a local folder, the tiny random ViT) and conv support in the methods."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from bench.models import ModelUnavailableError, load_model
from bench.run import build
from bench.vision_models import ImageSpec, load_image_model, plain_pointwise_convs
from methods.base import WrapContext
from tasks.base import HeadSpec
from tasks.vision import ImageClassificationTask, to_pixels
from tests.helpers import CONF, REPO, compose_cfg

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]  # label ids 0-9
HUB_TASKS = ["vision/cifar100", "vision/pets", "vision/flowers102", "vision/eurosat"]


def cifar10(**overrides) -> ImageClassificationTask:
    keys = OmegaConf.load(CONF / "task" / "vision" / "cifar10.yaml").task
    return instantiate(OmegaConf.merge(keys, overrides))


def efficientnet_cfg(size: int = 32):
    """conf/model/efficientnet_lite0.yaml at a small input size (fast on a CPU; the padding is exact at any size)."""
    return OmegaConf.merge(OmegaConf.load(CONF / "model" / "efficientnet_lite0.yaml"), {"image_size": size})


@pytest.fixture(scope="module")
def efficientnet():
    torch.manual_seed(0)
    return load_image_model(efficientnet_cfg(), HeadSpec(kind="image_cls", num_labels=10))


# ------------------------------------------------------------------------------------------------ data
def test_offline_cifar10_has_1000_train_and_1000_test_images_labelled_by_folder():
    task = cifar10()
    for split in ("train", "eval"):
        rows = task.examples(split)
        assert len(rows) == 1000
        assert all(Path(r.image).parent.name == CIFAR10[r.label] for r in rows)  # alphabetical folder = CIFAR id
        assert torch.bincount(torch.tensor([r.label for r in rows])).tolist() == [100] * 10
        assert all(Path(r.image).parent.parent.name == ("train" if split == "train" else "test") for r in rows)
    assert task.eval_split == "test" and "1000 images" in task.eval_note and "official" in task.eval_note
    assert task.length(rows[0]) == 1 and task.head == HeadSpec(kind="image_cls", num_labels=10)


def test_train_subset_is_seeded_and_eval_subset_is_fixed():
    task = cifar10(max_train_samples=100, max_eval_samples=50)
    a, b, c = task.examples("train", seed=0), task.examples("train", seed=0), task.examples("train", seed=1)
    assert len(a) == 100 and a == b and a != c
    assert task.examples("eval", seed=0) == task.examples("eval", seed=5) and len(task.examples("eval")) == 50
    assert "subset of 50 images" in task.eval_note


def test_chance_is_the_majority_class_share():
    task = cifar10()
    assert task.chance(task.examples("eval")) == {"accuracy": 0.1}  # 100 test images per class
    rows = task.examples("eval")
    skewed = [r for r in rows if r.label == 3] + [r for r in rows if r.label != 3][:100]  # 100 cats of 200
    assert task.chance(skewed) == {"accuracy": 0.5}


def test_wrong_num_labels_names_the_key():
    with pytest.raises(ValueError, match="task.num_labels=7"):
        cifar10(num_labels=7).examples("train")


def test_to_pixels_resizes_and_normalises_exactly():
    image = Image.new("RGB", (32, 32), (51, 102, 204))
    x = to_pixels(image, 48, (0.5, 0.4, 0.3), (0.25, 0.5, 1.0), augment=False)  # (3, 48, 48)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    want = torch.tensor([(51 / 255 - 0.5) / 0.25, (102 / 255 - 0.4) / 0.5, (204 / 255 - 0.3) / 1.0])
    torch.testing.assert_close(x.mean(dim=(1, 2)), want)
    assert float(x.std(dim=(1, 2)).max()) < 1e-6  # a flat image stays flat through the resize


def test_collate_shapes_and_augmentation_only_in_training():
    task, spec = cifar10(), ImageSpec(size=40, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    rows = task.examples("train")[:6]
    torch.manual_seed(0)
    train1, train2 = task.collate_fn(spec)(rows), task.collate_fn(spec)(rows)
    eval1, eval2 = task.eval_collate_fn(spec)(rows), task.eval_collate_fn(spec)(rows)
    assert train1["pixel_values"].shape == eval1["pixel_values"].shape == (6, 3, 40, 40)
    assert eval1["labels"].dtype == torch.long and eval1["labels"].tolist() == [r.label for r in rows]
    assert torch.equal(eval1["pixel_values"], eval2["pixel_values"])  # evaluation is deterministic
    assert not torch.equal(train1["pixel_values"], train2["pixel_values"])  # random flips and crops
    with pytest.raises(TypeError, match="image model"):
        task.collate_fn(object())  # a text tokenizer is not an ImageSpec


class FakeDataset:
    """The slice of datasets.Dataset the task uses: column_names, a column by name, a row by index."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows, self.column_names = rows, list(rows[0])
        self.decoded = 0

    def __getitem__(self, key):
        if isinstance(key, str):
            return [r[key] for r in self.rows]
        self.decoded += 1
        return self.rows[key]


def test_hub_source_reads_columns_and_decodes_images_lazily(monkeypatch):
    splits = {s: FakeDataset([{"img": Image.new("RGB", (8, 8), (i, 0, 0)), "fine_label": i % 3} for i in range(n)])
              for s, n in (("train", 20), ("test", 9))}
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda hub_id, config, split: calls.append((hub_id, config, split)) or splits[split]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = ImageClassificationTask(name="vision/x", num_labels=3, source="hub", hub_id="org/x", image_column="img",
                                   label_column="fine_label", max_train_samples=5)
    train, test = task.examples("train", seed=0), task.examples("eval")
    assert len(train) == 5 and len(test) == 9 and [r.label for r in test] == [i % 3 for i in range(9)]
    assert splits["train"].decoded == 0 and calls == [("org/x", None, "train"), ("org/x", None, "test")]
    batch = task.eval_collate_fn(ImageSpec(16, (0.0,) * 3, (1.0,) * 3))(test[:4])  # (4, 3, 16, 16)
    torch.testing.assert_close(batch["pixel_values"][:, 0, 0, 0], torch.arange(4) / 255)  # red channel = row index
    assert splits["test"].decoded == 4

    bad = ImageClassificationTask(name="vision/x", num_labels=3, source="hub", hub_id="org/x")  # image/label columns
    with pytest.raises(ValueError, match="task.image_column"):
        bad.examples("train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(ImportError, match=r"\.\[hub\]"):
        ImageClassificationTask(name="vision/x", num_labels=3, source="hub", hub_id="org/x").examples("train")


@pytest.mark.parametrize("task", HUB_TASKS)
def test_hub_tasks_compose_with_their_vit_and_vtab1k_subset(task):
    cfg = compose_cfg([f"task={task}"])
    assert HydraConfig.get().runtime.choices["model"] == "vit_base" and cfg.model.source == "hub"
    obj = instantiate(cfg.task)
    assert obj.source == "hub" and obj.max_train_samples == 1000 and obj.head.num_labels >= 10


def test_cifar10_picks_efficientnet_unless_the_command_line_names_a_model():
    compose_cfg(["task=vision/cifar10"])
    assert HydraConfig.get().runtime.choices["model"] == "efficientnet_lite0"
    cfg = compose_cfg(["task=vision/cifar10", "model=tiny_vit"])
    assert HydraConfig.get().runtime.choices["model"] == "tiny_vit" and cfg.model.source == "random"


# ------------------------------------------------------------------------------------------------ models
def test_pointwise_conversion_is_bit_identical_and_complete():
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    original = EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()
    converted = copy.deepcopy(original)
    names = plain_pointwise_convs(converted)
    assert len(names) == 15 + 16 + 1  # expand convs (blocks 1-15), project convs (16 blocks), the head conv
    assert all(type(converted.get_submodule(n)) is nn.Conv2d for n in names)
    left = [n for n, m in converted.named_modules() if type(m).__name__ == "Conv2dStaticSamePadding"]
    assert left and all(converted.get_submodule(n).kernel_size != (1, 1) for n in left)  # stem + depthwise stay
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(converted(x), original(x))


def test_efficientnet_loader_head_spec_and_frozen_batchnorm(efficientnet):
    model, spec = efficientnet.model, efficientnet.tokenizer
    yaml = OmegaConf.load(CONF / "model" / "efficientnet_lite0.yaml")
    assert efficientnet.head_modules == ["classifier"] and model.classifier.out_features == 10
    assert spec == ImageSpec(32, tuple(yaml.image_mean), tuple(yaml.image_std))
    assert efficientnet.source.endswith("efficientnet-lite0-57934424.pth")
    model = copy.deepcopy(model).train()
    bn = model.backbone._bn0
    before = bn.running_mean.clone()
    out = model(pixel_values=torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3]))
    assert out.logits.shape == (4, 10) and out.loss.ndim == 0
    assert not bn.training and torch.equal(bn.running_mean, before)  # ImageNet statistics kept while training


def test_vit_from_a_local_folder_reads_its_image_processor(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=5)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32},
         "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / "vit_base.yaml"), {"id": str(tmp_path)})
    loaded = load_model(cfg, HeadSpec(kind="image_cls", num_labels=3))  # dispatched on the head kind
    assert loaded.tokenizer == ImageSpec(32, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert loaded.head_modules == ["classifier"] and loaded.model.classifier.out_features == 3  # a new head
    with pytest.raises(ModelUnavailableError, match="model=efficientnet_lite0"):
        load_model(OmegaConf.merge(cfg, {"id": str(tmp_path / "missing")}), HeadSpec(kind="image_cls", num_labels=3))


# ------------------------------------------------------------------------------------------------ methods on convs
@pytest.mark.parametrize("method, override", [("vera", {}), ("lora", {"init": "pissa"}), ("bone", {})])
def test_a_method_that_cannot_wrap_conv_names_the_type(efficientnet, method, override):
    node = OmegaConf.merge(OmegaConf.load(CONF / "method" / f"{method}.yaml"), override,
                           {"target_modules": list(efficientnet_cfg().target_modules)})
    with pytest.raises(TypeError, match=r"layer 'backbone\._blocks\.\d+\._\w+_conv' of type Conv2d"):
        build(node, "method", method).prepare(copy.deepcopy(efficientnet.model),
                                                   WrapContext(head_modules=["classifier"]))


def test_lora_refuses_a_padded_subclass_conv_with_a_clear_message(efficientnet):
    from methods.lora import LoRA

    with pytest.raises(TypeError, match="Conv2dStaticSamePadding"):
        LoRA(lr=1e-3, target_modules=["_conv_stem"]).prepare(copy.deepcopy(efficientnet.model),
                                                             WrapContext(head_modules=["classifier"]))


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_convs_delta_merge_and_count(efficientnet, use_dora):
    from methods.lora import LoRA

    ctx = WrapContext(head_modules=["classifier"])
    method = LoRA(lr=1e-3, target_modules=["_project_conv", "_conv_head"], r=4, alpha=8, use_dora=use_dora)
    base = copy.deepcopy(efficientnet.model).eval()
    model = method.prepare(copy.deepcopy(base), ctx).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, base(pixel_values=x).logits)  # B = 0 at init
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(0.05 * torch.randn_like(p))  # as if trained
    trainable = sum(p.numel() for p in method.trainable_parameters(model).values())
    assert trainable == method.expected_trainable(copy.deepcopy(base), ctx)
    deltas = method.delta_weights(model)
    assert len(deltas) == 17 and all(d.ndim == 4 and d.abs().max() > 0 for d in deltas.values())
    if not use_dora:  # LoRA's ΔW, as a matrix (out, in·kh·kw), has rank ≤ r
        assert max(int(torch.linalg.matrix_rank(d.flatten(1).double(), rtol=1e-5)) for d in deltas.values()) <= 4
    with torch.no_grad():
        unmerged = model(pixel_values=x).logits  # (2, 10)
        merged = method.merge(copy.deepcopy(model))
        torch.testing.assert_close(merged(pixel_values=x).logits, unmerged, rtol=1e-4, atol=1e-4)
    for name, d in deltas.items():  # the closed form equals what merging added to W0
        torch.testing.assert_close(merged.get_submodule(name).weight - base.get_submodule(name).weight, d,
                                   rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ end to end
def run_bench(tmp_path: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench", "+experiment=smoke", f"results_dir={tmp_path}", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (tmp_path / "runs").glob("*/record.json")
    return json.loads(path.read_text())


def test_bench_tiny_vit_on_cifar10(tmp_path):
    from bench.run import run

    record = run(compose_cfg(["method=lora", "task=vision/cifar10", "model=tiny_vit", "+experiment=smoke",
                              f"results_dir={tmp_path}"]))
    assert record["status"] == "completed" and record["model"] == "tiny_vit" and record["task"] == "vision/cifar10"
    assert record["main_metric"] == "accuracy" and 0.0 <= record["metrics"]["accuracy"] <= 1.0
    assert record["eval_split"] == "test" and "official" in record["eval_note"]
    r, d = 8, 64  # LoRA r=8 on q, k, v, o (64×64) and fc1 (64→128), fc2 (128→64) of 2 layers + the 10-way head
    assert record["params"]["trainable"] == 2 * (4 * r * (d + d) + 2 * r * (d + 2 * d)) + (d * 10 + 10)


@pytest.mark.integration
def test_bench_efficientnet_lora_offline(tmp_path):
    record = run_bench(tmp_path, "+method=lora", "+task=vision/cifar10", "train.max_steps=3",
                       "task.max_eval_samples=16", "model.image_size=64")
    assert record["status"] == "completed" and record["model"] == "efficientnet_lite0"
    assert record["params"]["model_source"].endswith("efficientnet-lite0-57934424.pth")  # pretrained, offline
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0 and [c["step"] for c in record["curve"]][-1] == 3
    deltas = load_file(str(tmp_path / "runs" / record["id"] / record["artifacts"]["delta"]))
    assert len(deltas) == 32 and deltas["backbone._conv_head"].shape == (1280, 320, 1, 1)
    assert all(d.abs().max() > 0 for d in deltas.values())  # three steps moved every adapted conv

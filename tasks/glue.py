"""GLUE: the eight sentence(-pair) classification and regression tasks (Wang et al., arXiv 1804.07461)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from tasks.base import Batch, HeadSpec, Task, subset
from tasks.glue_data import GLUE_SPECS, Example, compute_metrics, load_hub, load_offline


class GlueTask(Task):
    """One GLUE task as sequence classification (STS-B as regression) with the official metrics.

    Data: the offline copies in tasks/data/glue (each folder has its PROVENANCE.md) or the hub dataset
    `nyu-mll/glue`. MNLI and QQP have no official dev set offline: their eval rows are held out from train,
    and every record says so (eval_split, eval_note).

    Args:
        subtask: cola, sst2, mrpc, stsb, qnli, rte, mnli or qqp.
        source: offline (bundled copies) or hub (datasets.load_dataset).
        hub_id: the hub dataset id for source=hub.
        max_length: tokens per example after truncation.
        max_train_samples: a seeded random subset of train (null: all).
        max_eval_samples: a fixed random subset of eval (seed eval_subset_seed; null: all).
        eval_subset_seed: the seed of the eval subset, fixed so that every run scores the same rows.
    """

    suite = "glue"

    def __init__(
        self,
        subtask: str,
        source: Literal["offline", "hub"] = "offline",
        hub_id: str = "nyu-mll/glue",
        max_length: int = 128,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        eval_subset_seed: int = 0,
    ) -> None:
        if subtask not in GLUE_SPECS:
            raise ValueError(f"unknown GLUE task {subtask!r}; choose from {sorted(GLUE_SPECS)}")
        if source not in ("offline", "hub"):
            raise ValueError(f"task.source must be offline or hub, got {source!r}")
        self.spec = GLUE_SPECS[subtask]
        self.name = f"glue/{subtask}"
        self.source, self.hub_id, self.max_length = source, hub_id, int(max_length)
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.eval_subset_seed = eval_subset_seed
        self.head = HeadSpec(
            kind="seq_cls",
            num_labels=self.spec.num_labels,
            problem_type="regression" if self.spec.is_regression else "single_label_classification",
        )
        self.main_metric = self.spec.main_metric
        self.higher_is_better = {m: True for m in self.spec.metrics}
        official = self.spec.eval_is_official_dev or source == "hub"
        self.eval_split = "dev" if official else "heldout_from_train"
        self.eval_note = "" if source == "hub" else self.spec.eval_note

    def examples(self, split: Literal["train", "eval", "validation"], seed: int = 0) -> list[Example]:
        source = "train" if split == "validation" else split
        rows = load_offline(self.spec.name, source) if self.source == "offline" else load_hub(self.spec.name, source, self.hub_id)
        if source == "train":
            return self.train_split(rows, split, self.max_train_samples, seed)
        return subset(rows, self.max_eval_samples, self.eval_subset_seed)

    def length(self, row: Example) -> int:
        return len(row.text_a) + len(row.text_b or "")

    def collate_fn(self, tokenizer: Any) -> Callable[[Sequence[Example]], Batch]:
        label_dtype = torch.float32 if self.spec.is_regression else torch.long

        def collate(rows: Sequence[Example]) -> Batch:
            texts = [r.text_a for r in rows]
            pairs = [r.text_b for r in rows] if rows[0].text_b is not None else None
            batch = tokenizer(texts, pairs, truncation=True, max_length=self.max_length,
                              padding=True, return_tensors="pt")  # dynamic padding to the longest row
            batch["labels"] = torch.tensor([r.label for r in rows], dtype=label_dtype)  # (B,)
            return dict(batch)

        return collate

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        preds, labels = [], []
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, C)
            logits = logits.float()
            preds.append(logits.squeeze(-1) if self.spec.is_regression else logits.argmax(-1))
            labels.append(batch["labels"])
        model.train(was_training)
        return compute_metrics(self.spec.name, torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy())

    def chance(self, rows: Sequence[Example]) -> dict[str, float]:
        """Per metric, the best of the constant predictions (each class in turn); correlations (STS-B): 0."""
        gold = np.asarray([r.label for r in rows])
        if self.spec.is_regression:
            return {metric: 0.0 for metric in self.spec.metrics}
        scores = [compute_metrics(self.spec.name, np.full(len(gold), c), gold) for c in range(self.spec.num_labels)]
        return {metric: max(s[metric] for s in scores) for metric in self.spec.metrics}

"""The task contract: a dataset, how to batch it, and its metric.

A task is configured by conf/task/<name>.yaml (`_target_` names the class); the option name is the file name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HeadSpec:
    """The model head a task needs: what bench/models.py loads on top of the backbone.

    seq_cls: a new classification/regression head with `num_labels` outputs (AutoModelForSequenceClassification).
    causal_lm: the model's own language-modelling head (AutoModelForCausalLM); no new module, num_labels unused.
    image_cls: a new image-classification head with `num_labels` outputs (bench/vision_models.py).
    diffusion: a text-to-image diffusion model trained on its denoising loss (bench/diffusion.py); no head.
    """

    kind: Literal["seq_cls", "causal_lm", "image_cls", "diffusion"]
    num_labels: int = 0
    problem_type: Literal["single_label_classification", "regression"] = "single_label_classification"


class Task:
    """A task: train/eval examples, a collate function, and evaluation.

    Attributes set by subclasses:
        name: the option name, e.g. "glue/sst2".
        suite: the suite it belongs to ("glue"), or None.
        head: the model head it needs.
        main_metric: the metric leaderboards rank by.
        higher_is_better: {metric: direction} for every metric evaluate() returns.
        eval_split: "dev" for an official dev set, "heldout_from_train" when rows were held out from train.
        eval_note: a sentence every record and report carries when the eval split is not the official one.
        run_dir: the run's folder, set by the runner before training: where evaluate() may save artifacts
            (generated images, samples) beside the record. None outside a run.
        holdout: the validation split carved from the train split under a tuning protocol (set by the runner from
            conf/protocol); None for a plain run. Tuning trials score on it; every run under the protocol trains on
            the train split without it, so no trial ever sees the reported split and no run trains on the rows
            that chose its hyper-parameters.
    """

    name: str
    suite: str | None = None
    head: HeadSpec
    main_metric: str
    higher_is_better: dict[str, bool]
    eval_split: str = "dev"
    eval_note: str = ""
    run_dir: Path | None = None
    holdout: Holdout | None = None

    def examples(self, split: Literal["train", "eval", "validation"], seed: int = 0) -> Sequence[Any]:
        """Rows of a split: "train" (a seeded subset of at most max_train_samples rows, without the holdout),
        "eval" (the reported split) or "validation" (the holdout; only under a tuning protocol)."""
        raise NotImplementedError

    def train_split(self, rows: Sequence[Any], split: str, limit: int | None, seed: int) -> list[Any]:
        """The "train" or "validation" rows of a task whose whole train split is `rows`: the holdout is carved
        first (its own fixed seed, independent of the run's), then the train subset is drawn from the rest."""
        if self.holdout is None:
            if split == "validation":
                raise ValueError(f"task {getattr(self, 'name', '?')}: the validation split exists only under a tuning "
                                 "protocol (protocol=cheap or protocol=paper)")
            return subset(rows, limit, seed)
        kept, held = self.holdout.carve(rows)
        return held if split == "validation" else subset(kept, limit, seed)

    def length(self, row: Any) -> int:
        """A cheap length proxy of a row (characters), for length-grouped batching."""
        raise NotImplementedError

    def collate_fn(self, tokenizer: Any) -> Callable[[list[Any]], Batch]:
        """Training batches: what `model(**batch)` takes, `labels` included (the loss comes from the model)."""
        raise NotImplementedError

    def eval_collate_fn(self, tokenizer: Any) -> Callable[[list[Any]], Batch]:
        """Evaluation batches, for evaluate() alone (a generative task: left-padded prompts and gold answers).
        The default is the training collate. A task may keep `tokenizer` to decode generations in evaluate()."""
        return self.collate_fn(tokenizer)

    def forgetting_probe(self, model: nn.Module, device: torch.device,
                         autocast_dtype: torch.dtype | None) -> dict[str, float]:
        """{"forget_ce": loss on a fixed sample of general text} for tasks that measure forgetting (generative
        tasks); the runner calls it before and after fine-tuning. Default: {} (no probe)."""
        return {}

    def objective(self, model: Callable[..., Any], batch: Batch) -> Any:
        """The training step's forward: an output whose `.loss` the optimizer minimises (and whose `.logits` a
        method's extra loss may read). `model` is the model or its DDP wrapper. Default: `model(**batch)`, the
        model's own loss; a task with its own objective (unlearning's gradient ascent) overrides it."""
        return model(**batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        raise NotImplementedError

    def chance(self, rows: Sequence[Any]) -> dict[str, float]:
        """The score of the best input-independent prediction on `rows`, per metric: the floor that a fine-tuned
        model must clear before its score says anything (the majority class of a classification task, the most
        frequent answer of a generative one; 0 for a correlation, the expected correlation of any prediction that
        ignores the input). The runner records it beside the metrics; the leaderboard prints it as a row and marks
        scores not significantly above it. Default: {} (no such floor, e.g. image quality)."""
        return {}


#: the prefix of a training batch's second set of rows (unlearning's retain rows, beside the forget rows)
RETAIN_PREFIX = "retain_"


def model_inputs(batch: Batch) -> Batch:
    """The keys of a training batch that `model(**batch)` takes: a batch that pairs two sets of rows (unlearning)
    carries its second set under RETAIN_PREFIX keys, which only the task's objective reads."""
    return {k: v for k, v in batch.items() if not k.startswith(RETAIN_PREFIX)}


@dataclass(frozen=True)
class Holdout:
    """A validation split carved from a train split: `size` rows (at most `max_fraction` of them), chosen by a
    permutation seeded with `seed` alone, so every method, seed and trial of a protocol sees the same rows."""

    size: int
    seed: int
    max_fraction: float = 0.2

    def __post_init__(self) -> None:
        if int(self.size) < 1 or not 0 < float(self.max_fraction) < 1:
            raise ValueError(f"protocol.validation: size must be >= 1 and max_fraction in (0, 1); "
                             f"got size={self.size}, max_fraction={self.max_fraction}")

    def indices(self, n: int) -> list[int]:
        """Sorted indices of the held-out rows among `n` train rows."""
        k = min(int(self.size), int(n * float(self.max_fraction)))
        if k < 1:
            raise ValueError(f"a train split of {n} rows is too small to hold out a validation split "
                             f"(max_fraction={self.max_fraction})")
        g = torch.Generator().manual_seed(int(self.seed))
        return torch.randperm(n, generator=g)[:k].sort().values.tolist()

    def carve(self, rows: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """(rows kept for training, held-out rows), each in the original order."""
        held = set(self.indices(len(rows)))
        return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def subset(rows: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """A deterministic random subset of at most `limit` rows (all rows, in order, when limit is None)."""
    if limit is None or limit >= len(rows):
        return list(rows)
    if limit < 1:
        raise ValueError(f"a sample limit must be >= 1 or null, got {limit}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(rows), generator=g)[:limit].sort().values
    return [rows[i] for i in idx.tolist()]


def load_hub_dataset(path: str, name: str | None = None, split: str = "train", data_files: str | None = None, *,
                     offline: str) -> Any:
    """`datasets.load_dataset(path, name, split=split)` (with `data_files` for a JSON file or URL), failing with the
    fix: a missing `datasets` package names the `hub` extra, an unreachable hub names the offline alternative
    (`offline`, e.g. "use task.source=offline")."""
    try:
        import datasets  # optional and heavy: imported only when a task reads from the hub
    except ImportError as e:
        raise ImportError(f"loading {path!r} needs the Hugging Face `datasets` package: pip install 'deltabench[hub]' "
                          f"(in a checkout: pip install -e '.[hub]'); or {offline}") from e
    extra = {"data_files": data_files} if data_files else {}
    try:
        return datasets.load_dataset(path, name, split=split, **extra)
    except (OSError, ConnectionError) as e:  # requests / huggingface_hub connection errors are OSErrors
        raise RuntimeError(f"could not load {path!r} (config {name!r}, split {split!r}) from the Hugging Face hub "
                           f"(hub unreachable or no network?): {e}. Offline, {offline}.") from e

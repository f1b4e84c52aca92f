"""GLUE task specifications, data loading and metrics.

Two data sources are supported:

* **offline** (:func:`load_offline`): the byte copies bundled in ``tasks/data/glue/<task>/``.
  Each folder has a ``PROVENANCE.md`` naming the source repository, commit and path of every
  file, and listing the format traps this module handles (MRPC is UTF-8 with a BOM, raw ``"``
  characters inside TSV fields, CoLA has no header, RTE train is the SuperGLUE jsonl copy,
  MNLI/QNLI/QQP samples are JSON objects keyed ``"0".."N"``, ...).
* **hub** (:func:`load_hub`): the Hugging Face ``nyu-mll/glue`` dataset (needs ``datasets`` and
  network access).

Labels are always integer class ids in the order of :attr:`GlueSpec.label_names` (which is the
order used by the HF ``glue`` dataset), or a float similarity score for STS-B.

Important: for MNLI and QQP no official GLUE dev set is available offline; the offline "eval"
split is 1000 rows held out from GLUE *train* (see :attr:`GlueSpec.eval_note`). Numbers on that
split are not comparable to published dev-set numbers.

Only the standard library, numpy, scipy and scikit-learn are imported at module level.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tasks.base import load_hub_dataset

__all__ = [
    "DEFAULT_DATA_DIR",
    "GLUE_SPECS",
    "GLUE_TASKS",
    "Example",
    "GlueSpec",
    "Split",
    "compute_metrics",
    "get_spec",
    "load_hub",
    "load_offline",
    "offline_paths",
]

Split = Literal["train", "eval"]

#: Folder holding the bundled offline GLUE copies (one sub-folder per task).
DEFAULT_DATA_DIR: Path = Path(__file__).resolve().parent / "data" / "glue"


# --------------------------------------------------------------------------------------------
# Task specifications
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueSpec:
    """Static description of one GLUE task.

    Attributes:
        name: Task name as used by the HF ``glue`` config (e.g. ``"sst2"``).
        text_keys: Names of the text fields in the HF ``glue`` dataset (1 or 2 entries).
        label_names: Class names in HF ``glue`` label order (class id = index). Empty for STS-B.
            ``("0", "1")`` means negative/positive style labels (unacceptable/acceptable,
            not paraphrase/paraphrase, not duplicate/duplicate, negative/positive).
        is_regression: True for STS-B (float score in [0, 5]).
        num_labels: Number of model outputs (1 for regression).
        metrics: Metric names reported by :func:`compute_metrics`.
        main_metric: The metric used for model selection / leaderboards.
        eval_is_official_dev: False when the offline eval split is not the official GLUE dev set.
        eval_note: Human-readable caveat about the offline eval (or train) data; ``""`` if none.
        hub_eval_split: HF split used as eval by :func:`load_hub`.
        train_note: Human-readable caveat about the offline train data; ``""`` if none.
    """

    name: str
    text_keys: tuple[str, ...]
    label_names: tuple[str, ...]
    is_regression: bool
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    eval_is_official_dev: bool
    eval_note: str
    hub_eval_split: str
    train_note: str = ""

    @property
    def is_pair(self) -> bool:
        """Whether the task has two text fields."""
        return len(self.text_keys) == 2


_HELDOUT_TRAIN = "8,999-row sample of GLUE train (train_sample_9k.json), not the full GLUE train set"

GLUE_SPECS: dict[str, GlueSpec] = {
    "cola": GlueSpec(
        name="cola",
        text_keys=("sentence",),
        label_names=("0", "1"),  # 0 unacceptable, 1 acceptable
        is_regression=False,
        num_labels=2,
        metrics=("matthews_corr",),
        main_metric="matthews_corr",
        eval_is_official_dev=True,
        eval_note="",
        hub_eval_split="validation",
    ),
    "sst2": GlueSpec(
        name="sst2",
        text_keys=("sentence",),
        label_names=("0", "1"),  # 0 negative, 1 positive
        is_regression=False,
        num_labels=2,
        metrics=("accuracy",),
        main_metric="accuracy",
        eval_is_official_dev=True,
        eval_note="",
        hub_eval_split="validation",
    ),
    "mrpc": GlueSpec(
        name="mrpc",
        text_keys=("sentence1", "sentence2"),
        label_names=("0", "1"),  # 0 not paraphrase, 1 paraphrase
        is_regression=False,
        num_labels=2,
        metrics=("f1", "accuracy"),
        main_metric="f1",
        eval_is_official_dev=True,
        eval_note="",
        hub_eval_split="validation",
    ),
    "stsb": GlueSpec(
        name="stsb",
        text_keys=("sentence1", "sentence2"),
        label_names=(),
        is_regression=True,
        num_labels=1,
        metrics=("pearson", "spearman"),
        main_metric="pearson",
        eval_is_official_dev=True,
        eval_note="",
        hub_eval_split="validation",
    ),
    "qnli": GlueSpec(
        name="qnli",
        text_keys=("question", "sentence"),
        label_names=("entailment", "not_entailment"),
        is_regression=False,
        num_labels=2,
        metrics=("accuracy",),
        main_metric="accuracy",
        eval_is_official_dev=True,
        eval_note="",
        hub_eval_split="validation",
        train_note=f"offline train is an {_HELDOUT_TRAIN} (104,743 rows)",
    ),
    "rte": GlueSpec(
        name="rte",
        text_keys=("sentence1", "sentence2"),
        label_names=("entailment", "not_entailment"),
        is_regression=False,
        num_labels=2,
        metrics=("accuracy",),
        main_metric="accuracy",
        eval_is_official_dev=True,
        eval_note=(
            "eval is the official GLUE RTE dev.tsv; offline training uses the SuperGLUE copy of RTE "
            "train (train.superglue.jsonl, the same 2,490 examples), as no unmodified GLUE RTE "
            "train.tsv was available"
        ),
        hub_eval_split="validation",
        train_note="offline train is the SuperGLUE RTE train copy (train.superglue.jsonl)",
    ),
    "mnli": GlueSpec(
        name="mnli",
        text_keys=("premise", "hypothesis"),
        label_names=("entailment", "neutral", "contradiction"),
        is_regression=False,
        num_labels=3,
        metrics=("accuracy",),
        main_metric="accuracy",
        eval_is_official_dev=False,
        eval_note=(
            "no official GLUE dev set here: eval rows are 1000 rows held out from GLUE train "
            "(heldout_from_train_1k.json), not MNLI-m dev; the hub source evaluates on "
            "validation_matched (MNLI-m)"
        ),
        hub_eval_split="validation_matched",
        train_note=f"offline train is an {_HELDOUT_TRAIN} (392,702 rows)",
    ),
    "qqp": GlueSpec(
        name="qqp",
        text_keys=("question1", "question2"),
        label_names=("0", "1"),  # 0 not duplicate, 1 duplicate
        is_regression=False,
        num_labels=2,
        metrics=("f1", "accuracy"),
        main_metric="f1",
        eval_is_official_dev=False,
        eval_note=(
            "no official GLUE dev set here: eval rows are 1000 rows held out from GLUE train "
            "(heldout_from_train_1k.json), not QQP dev; the hub source evaluates on validation"
        ),
        hub_eval_split="validation",
        train_note=f"offline train is an {_HELDOUT_TRAIN} (363,846 rows)",
    ),
}

#: Task names in the conventional GLUE order.
GLUE_TASKS: tuple[str, ...] = tuple(GLUE_SPECS)


def get_spec(task: str) -> GlueSpec:
    """Return the :class:`GlueSpec` of ``task`` (case-insensitive; ``"sst-2"``/``"sts-b"`` accepted).

    Raises:
        ValueError: if the task is not one of the 8 supported GLUE tasks.
    """
    key = task.strip().lower().replace("-", "")
    try:
        return GLUE_SPECS[key]
    except KeyError:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(GLUE_SPECS)}") from None


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One labelled GLUE example.

    Attributes:
        text_a: First (or only) text.
        text_b: Second text for pair tasks, ``None`` for single-sentence tasks.
        label: Class id in :attr:`GlueSpec.label_names` order, or a float score (STS-B).
    """

    text_a: str
    text_b: str | None
    label: int | float


# --------------------------------------------------------------------------------------------
# Offline loading
# --------------------------------------------------------------------------------------------

# Per task and split: the files (relative to the task folder) and their format.
_OFFLINE_FILES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "cola": {"train": (("train.tsv", "cola_tsv"),), "eval": (("dev.tsv", "cola_tsv"),)},
    "sst2": {
        "train": (("train_part1.tsv", "sst2_tsv"), ("train_part2.tsv", "sst2_tsv")),
        "eval": (("dev.tsv", "sst2_tsv"),),
    },
    "mrpc": {"train": (("train.tsv", "mrpc_tsv"),), "eval": (("dev.tsv", "mrpc_tsv"),)},
    "stsb": {"train": (("train.tsv", "stsb_tsv"),), "eval": (("dev.tsv", "stsb_tsv"),)},
    "qnli": {
        "train": (("train_sample_9k.json", "keyed_json"),),
        "eval": (("dev.tsv", "qnli_tsv"),),
    },
    "rte": {
        "train": (("train.superglue.jsonl", "superglue_jsonl"),),
        "eval": (("dev.tsv", "rte_tsv"),),
    },
    "mnli": {
        "train": (("train_sample_9k.json", "keyed_json"),),
        "eval": (("heldout_from_train_1k.json", "keyed_json"),),
    },
    "qqp": {
        "train": (("train_sample_9k.json", "keyed_json"),),
        "eval": (("heldout_from_train_1k.json", "keyed_json"),),
    },
}

# Header-based TSV formats: (text_a column, text_b column or None, label column).
_TSV_COLUMNS: dict[str, tuple[str, str | None, str]] = {
    "sst2_tsv": ("sentence", None, "label"),
    "mrpc_tsv": ("#1 String", "#2 String", "Quality"),
    "stsb_tsv": ("sentence1", "sentence2", "score"),
    "qnli_tsv": ("question", "sentence", "label"),
    "rte_tsv": ("sentence1", "sentence2", "label"),
}


def _check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def offline_paths(task: str, split: Split, data_dir: Path | None = None) -> tuple[Path, ...]:
    """Return the offline files that :func:`load_offline` reads for ``task``/``split``, in order.

    Paths are returned whether or not they exist.
    """
    spec = get_spec(task)
    _check_split(split)
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    return tuple(root / spec.name / fname for fname, _ in _OFFLINE_FILES[spec.name][split])


def _parse_label(spec: GlueSpec, raw: Any, where: str) -> int | float:
    """Map a raw label (string or number) to a class id or a float score."""
    if spec.is_regression:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: cannot parse score {raw!r} as float") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}: non-finite score {raw!r}")
        return value
    text = str(raw).strip()
    try:
        return spec.label_names.index(text)
    except ValueError:
        raise ValueError(
            f"{where}: unknown label {raw!r} for task {spec.name!r} (expected one of {spec.label_names})"
        ) from None


def _read_tsv(path: Path) -> list[list[str]]:
    """Read a tab-separated file verbatim (no quote processing; a UTF-8 BOM is dropped)."""
    # utf-8-sig strips the BOM of MRPC and is a no-op for files without one. QUOTE_NONE keeps
    # raw '"' characters (unbalanced in MRPC/QNLI/STS-B/RTE text) as part of the field.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def _parse_file(spec: GlueSpec, path: Path, fmt: str) -> tuple[Example, ...]:
    """Parse one offline file of format ``fmt`` into examples."""
    examples: list[Example] = []
    if fmt == "cola_tsv":
        # No header; columns: source code, label, author's mark, sentence.
        for lineno, row in enumerate(_read_tsv(path), start=1):
            where = f"{path}:{lineno}"
            if len(row) != 4:
                raise ValueError(f"{where}: expected 4 tab-separated columns, got {len(row)}")
            examples.append(Example(row[3], None, _parse_label(spec, row[1], where)))
    elif fmt in _TSV_COLUMNS:
        rows = _read_tsv(path)
        if not rows:
            raise ValueError(f"{path}: empty file")
        header, body = rows[0], rows[1:]
        col_a, col_b, col_label = _TSV_COLUMNS[fmt]
        wanted = [c for c in (col_a, col_b, col_label) if c is not None]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{path}: header {header} lacks column(s) {missing}")
        i_a = header.index(col_a)
        i_b = header.index(col_b) if col_b is not None else None
        i_label = header.index(col_label)
        for lineno, row in enumerate(body, start=2):
            where = f"{path}:{lineno}"
            if len(row) != len(header):
                raise ValueError(f"{where}: expected {len(header)} columns, got {len(row)}")
            text_b = row[i_b] if i_b is not None else None
            examples.append(Example(row[i_a], text_b, _parse_label(spec, row[i_label], where)))
    elif fmt == "keyed_json":
        # {"0": {"text_a": ..., "text_b": ..., "label": ...}, "1": ..., ...}
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object keyed '0'..'N'")
        keys = sorted(data, key=int)
        if keys != [str(i) for i in range(len(keys))]:
            raise ValueError(f"{path}: keys are not the consecutive row numbers '0'..'{len(keys) - 1}'")
        for key in keys:
            rec = data[key]
            where = f"{path}[{key!r}]"
            examples.append(Example(rec["text_a"], rec["text_b"], _parse_label(spec, rec["label"], where)))
    elif fmt == "superglue_jsonl":
        # One object per line: premise, hypothesis, label (string), idx.
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                where = f"{path}:{lineno}"
                examples.append(
                    Example(rec["premise"], rec["hypothesis"], _parse_label(spec, rec["label"], where))
                )
    else:  # pragma: no cover - internal table error
        raise AssertionError(f"unknown offline format {fmt!r}")
    return tuple(examples)


@functools.lru_cache(maxsize=64)
def _load_file_cached(task: str, path_str: str, fmt: str) -> tuple[Example, ...]:
    return _parse_file(GLUE_SPECS[task], Path(path_str), fmt)


def load_offline(task: str, split: Split, data_dir: Path | None = None) -> list[Example]:
    """Load ``task``/``split`` from the bundled offline GLUE copies.

    Files read (relative to ``data_dir/<task>/``):

    * train: ``train.tsv`` (cola, mrpc, stsb), ``train_part1.tsv`` + ``train_part2.tsv`` (sst2,
      concatenated = full GLUE train), ``train.superglue.jsonl`` (rte),
      ``train_sample_9k.json`` (qnli, mnli, qqp; a sample of GLUE train).
    * eval: ``dev.tsv`` (cola, sst2, mrpc, stsb, qnli, rte; the official GLUE dev sets),
      ``heldout_from_train_1k.json`` (mnli, qqp; **not** the official dev set, see
      :attr:`GlueSpec.eval_note`).

    Texts are returned verbatim (e.g. SST-2 sentences keep their trailing space, as in GLUE).

    Args:
        task: One of :data:`GLUE_TASKS`.
        split: ``"train"`` or ``"eval"``.
        data_dir: Folder with one sub-folder per task; defaults to :data:`DEFAULT_DATA_DIR`
            (``tasks/data/glue`` next to this module).

    Returns:
        A new list of (immutable) :class:`Example`; parsed files are cached per process.

    Raises:
        FileNotFoundError: if a needed file is missing.
        ValueError: for an unknown task/split or a malformed file.
    """
    spec = get_spec(task)
    _check_split(split)
    paths = offline_paths(spec.name, split, data_dir)
    fmts = [fmt for _, fmt in _OFFLINE_FILES[spec.name][split]]
    out: list[Example] = []
    for path, fmt in zip(paths, fmts):
        if not path.is_file():
            raise FileNotFoundError(
                f"offline GLUE file not found: {path} (task {spec.name!r}, split {split!r}). "
                "The offline copies live in tasks/data/glue/<task>/; see the PROVENANCE.md there "
                "for the expected files and their sources."
            )
        out.extend(_load_file_cached(spec.name, str(path.resolve()), fmt))
    return out


# --------------------------------------------------------------------------------------------
# Hub loading
# --------------------------------------------------------------------------------------------


def load_hub(task: str, split: Split, dataset_id: str = "nyu-mll/glue") -> list[Example]:
    """Load ``task``/``split`` from the Hugging Face Hub with ``datasets``.

    ``split="train"`` maps to the HF ``train`` split, ``split="eval"`` to
    :attr:`GlueSpec.hub_eval_split` (``validation_matched`` for MNLI, else ``validation``).
    Note that for MNLI and QQP this differs from the offline eval split (held-out train rows).

    Raises:
        ImportError: if ``datasets`` is not installed (``pip install deltabench[hub]``).
        RuntimeError: if the dataset cannot be fetched (no network / hub unreachable).
        ValueError: for an unknown task/split.
    """
    spec = get_spec(task)
    _check_split(split)
    hf_split = "train" if split == "train" else spec.hub_eval_split
    ds = load_hub_dataset(dataset_id, spec.name, hf_split,
                          offline="use task.source=offline to train/evaluate on the bundled copies in tasks/data/glue")

    key_a = spec.text_keys[0]
    key_b = spec.text_keys[1] if spec.is_pair else None
    out: list[Example] = []
    for row in ds:
        raw = row["label"]
        label: int | float = float(raw) if spec.is_regression else int(raw)
        out.append(Example(row[key_a], row[key_b] if key_b is not None else None, label))
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _correlation(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Correlation via scipy; NaN (without leaking a warning) when undefined (constant input)."""
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = fn(x, y)[0]
    return float(value)


def compute_metrics(
    task: str, predictions: np.ndarray | Sequence[Any], labels: np.ndarray | Sequence[Any]
) -> dict[str, float]:
    """Compute the GLUE metrics of ``task`` (see :attr:`GlueSpec.metrics`).

    Args:
        task: One of :data:`GLUE_TASKS`.
        predictions: Class ids of shape ``(n,)``, or logits of shape ``(n, num_labels)`` which
            are arg-maxed; for STS-B float scores of shape ``(n,)`` or ``(n, 1)``.
        labels: Gold class ids / scores of shape ``(n,)``.

    Returns:
        Plain Python floats keyed by metric name: ``accuracy``, ``f1`` (positive class 1;
        0.0 when there are no predicted and no true positives), ``matthews_corr`` (0.0 for
        constant predictions, sklearn's convention), ``pearson``/``spearman`` (NaN when
        undefined, i.e. when predictions or labels are constant: a constant predictor has no
        correlation and reporting 0.0 would hide that).

    Raises:
        ValueError: on empty input or mismatched lengths.
    """
    spec = get_spec(task)
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        preds = preds.astype(np.float64)
        gold = gold.astype(np.float64)
    else:
        if preds.ndim == 2:
            preds = preds.argmax(axis=-1)
        preds = preds.astype(np.int64)
        gold = gold.astype(np.int64)
    if preds.ndim != 1 or gold.ndim != 1:
        raise ValueError(f"expected 1-D predictions/labels, got shapes {preds.shape} and {gold.shape}")
    if preds.shape != gold.shape:
        raise ValueError(f"predictions ({preds.shape[0]}) and labels ({gold.shape[0]}) differ in length")
    if preds.size == 0:
        raise ValueError("cannot compute metrics on an empty set")

    result: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
            result[name] = float(accuracy_score(gold, preds))
        elif name == "f1":
            result[name] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0.0))
        elif name == "matthews_corr":
            result[name] = float(matthews_corrcoef(gold, preds))
        elif name == "pearson":
            result[name] = _correlation(stats.pearsonr, preds, gold)
        elif name == "spearman":
            result[name] = _correlation(stats.spearmanr, preds, gold)
        else:  # pragma: no cover - internal table error
            raise AssertionError(f"unknown metric {name!r}")
    return result

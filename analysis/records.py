"""Load run records (``<results_dir>/runs/<run_id>/record.json``) into a DataFrame."""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

RECORD_GLOB = "runs/*/record.json"

STATUSES = ("completed", "running", "preempted", "failed", "diverged", "pruned")

#: Columns before the per-metric ``metric.<name>`` columns.
LEADING_COLUMNS = [
    "id",
    "cell_key",
    "status",
    "method",
    "task",
    "suite",
    "model",
    "seed",
    "main_metric",
    "score",
    "chance",
]
#: Columns after the per-metric columns.
TRAILING_COLUMNS = [
    "trainable",
    "total",
    "adapter_bytes",
    "train_s",
    "step_s",
    "tokens_per_s",
    "peak_mem_bytes",
    "peak_mem_kind",
    "optimizer_state_bytes",
    "device",
    "eval_split",
    "eval_note",
    "role",
    "protocol",
    "budget",
    "trials",
    "chosen",
    "chosen_at_edge",
    "val_objective",
    "sharpness",
    "error_type",
    "error_message",
    "finished",
]

METRIC_PREFIX = "metric."

#: How the runner measured ``cost.peak_mem_bytes`` (``cost.peak_mem_kind``) -> a short label.
MEMORY_KINDS = {"rss": "RSS", "cuda_max_allocated": "CUDA max allocated",
                "cuda_max_reserved": "CUDA max reserved"}  # the last: PEFT method-comparison imports

#: Columns of ``curves_frame`` before the logged quantities (``loss``, ``lr``, ``grad_norm``, ...).
CURVE_KEYS = ["id", "cell_key", "status", "method", "task", "suite", "model", "seed", "step"]


class RecordWarning(UserWarning):
    """A record file was skipped or could not be interpreted."""


class NoRecordsError(FileNotFoundError):
    """No readable run record was found in a results directory."""


PROTOCOLS = Path(__file__).resolve().parents[1] / "conf" / "protocol"


def is_tuning_protocol(name: object) -> bool:
    """Whether records of protocol `name` were tuned: conf/protocol/<name>.yaml has trials (cheap, paper, sharp); a
    fixed setting (none, PEFT's peft_metamath) or a name this checkout has no file for is not."""
    if not isinstance(name, str) or name in ("", "none", "untuned"):
        return False
    path = PROTOCOLS / f"{name}.yaml"
    return path.is_file() and "trials" in ((yaml.safe_load(path.read_text()) or {}).get("protocol") or {})


def memory_kind_label(kind: object) -> str:
    """``RSS``, ``CUDA max allocated``; an unknown kind upper-cased; ``""`` when missing."""
    if not isinstance(kind, str) or not kind:
        return ""
    return MEMORY_KINDS.get(kind, kind.upper())


def scan_records(results_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Read every ``runs/*/record.json`` under ``results_dir``.

    Returns the parsed records and the paths that were skipped (unreadable,
    partially written or not a JSON object); each skip emits a ``RecordWarning``.
    """
    results_dir = Path(results_dir)
    records: list[dict[str, Any]] = []
    skipped: list[Path] = []
    for path in sorted(results_dir.glob(RECORD_GLOB)):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable record {path}: {exc}", RecordWarning, stacklevel=2)
            skipped.append(path)
            continue
        if not isinstance(record, dict):
            warnings.warn(f"skipping {path}: not a JSON object", RecordWarning, stacklevel=2)
            skipped.append(path)
            continue
        records.append(record)
    return records, skipped


#: Tuning roles whose runs only serve a study (a trial chooses values, a probe measures sharpness): never reported.
STUDY_ONLY_ROLES = ("trial", "probe")


def is_reported(record: Mapping[str, Any]) -> bool:
    """Whether a record can appear in a table: a plain run or a tuned study's reported rerun, not a trial or probe."""
    return (record.get("tuning") or {}).get("role") not in STUDY_ONLY_ROLES


def load_records(results_dir: Path) -> list[dict[str, Any]]:
    """Return the parsed records under ``results_dir``, skipping (with a warning) bad files."""
    records, _ = scan_records(results_dir)
    return records


def require_rows(rows: Any, results: Path, kind: str, command: str) -> None:
    """Raise ``NoRecordsError`` naming the command that makes some when a family report found no `kind` record."""
    if not len(rows):
        raise NoRecordsError(f"no completed {kind} record in {Path(results) / 'runs'}; run "
                             f"`python -m bench {command}` first")


def report_dir(results: Path, out_dir: Path | None) -> Path:
    """Where a report goes: `out_dir`, else the results directory (created)."""
    out = Path(out_dir or results)
    out.mkdir(parents=True, exist_ok=True)
    return out


def require_records(results_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """``scan_records``, raising ``NoRecordsError`` when no record could be read."""
    results_dir = Path(results_dir)
    records, skipped = scan_records(results_dir)
    if not records:
        extra = f" ({len(skipped)} unreadable record files skipped)" if skipped else ""
        raise NoRecordsError(
            f"no run records found in {results_dir / 'runs'} (looked for */record.json){extra}; "
            "run `python -m bench` first to produce some"
        )
    return records, skipped


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float:
    """A finite-or-NaN float for numeric values; NaN for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _timestamp(value: Any) -> pd.Timestamp:
    if not isinstance(value, str) or not value:
        return pd.NaT
    return pd.to_datetime(value, utc=True, errors="coerce")


def _recency(record: Mapping[str, Any]) -> float:
    """Seconds since the epoch of the record's latest known timestamp (-inf if none)."""
    stamps = _mapping(record.get("timestamps"))
    for key in ("finished", "started", "created"):
        ts = _timestamp(stamps.get(key))
        if not pd.isna(ts):
            return ts.timestamp()
    return -math.inf


def latest_per_cell(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Keep one record per ``cell_key``: the newest completed one, else the newest one.

    Records without a ``cell_key`` are all kept. Input order breaks timestamp ties
    (later wins).
    """
    best: dict[str, tuple[tuple[bool, float, int], Mapping[str, Any]]] = {}
    loose: list[Mapping[str, Any]] = []
    for order, record in enumerate(records):
        key = record.get("cell_key")
        if not key:
            loose.append(record)
            continue
        rank = (record.get("status") == "completed", _recency(record), order)
        if key not in best or rank > best[key][0]:
            best[key] = (rank, record)
    return [record for _, record in best.values()] + loose


def edge_keys(tuning: Mapping[str, Any]) -> list[str]:
    """The tuned numeric keys whose chosen value is the smallest or largest value the study tried: the optimum may
    lie outside the searched range."""
    chosen = _mapping(tuning.get("chosen"))
    tried = [_mapping(t.get("params")) for t in tuning.get("trial_values") or [] if isinstance(t, Mapping)]
    edges = []
    for key, value in sorted(chosen.items()):
        values = [p[key] for p in tried if isinstance(p.get(key), (int, float)) and not isinstance(p.get(key), bool)]
        if isinstance(value, (int, float)) and len(set(values)) > 2 and value in (min(values), max(values)):
            edges.append(key)
    return edges


def _row(record: Mapping[str, Any]) -> dict[str, Any]:
    metrics = _mapping(record.get("metrics"))
    params = _mapping(record.get("params"))
    cost = _mapping(record.get("cost"))
    error = _mapping(record.get("error"))
    main_metric = record.get("main_metric")
    message = error.get("message")
    row: dict[str, Any] = {
        "id": record.get("id"),
        "cell_key": record.get("cell_key"),
        "status": record.get("status"),
        "method": record.get("method"),
        "task": record.get("task"),
        "suite": record.get("suite"),
        "model": record.get("model"),
        "seed": record.get("seed"),
        "main_metric": main_metric,
        "score": _number(metrics.get(main_metric)) if main_metric else math.nan,
        "chance": chance_score(record),
    }
    for name, value in metrics.items():
        row[METRIC_PREFIX + str(name)] = _number(value)
    tuning = _mapping(record.get("tuning"))
    budget = _mapping(tuning.get("budget")) or _mapping(_mapping(record.get("config")).get("train"))
    sharpness = _mapping(tuning.get("sharpness"))
    row.update(
        role=tuning.get("role"),
        protocol=tuning.get("protocol") or "none",
        budget=(f"{budget.get('max_steps')}×{budget.get('batch_size')}"
                + (f"×{budget.get('grad_accum')}" if budget.get("grad_accum", 1) != 1 else "")) if budget else None,
        trials=_number(_mapping(tuning.get("trials")).get("total")),
        chosen=", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in sorted(_mapping(tuning.get("chosen")).items())) or None,
        chosen_at_edge=",".join(edge_keys(tuning)) or None,
        val_objective=_number(tuning.get("val_objective")),
        sharpness=_number(sharpness.get("lambda_max")),
    )
    row.update(
        trainable=_number(params.get("trainable")),
        total=_number(params.get("total")),
        adapter_bytes=_number(params.get("adapter_bytes")),
        train_s=_number(cost.get("train_s")),
        step_s=_number(cost.get("step_s")),
        tokens_per_s=_number(cost.get("tokens_per_s")),
        peak_mem_bytes=_number(cost.get("peak_mem_bytes")),
        peak_mem_kind=cost.get("peak_mem_kind"),
        optimizer_state_bytes=_number(cost.get("optimizer_state_bytes")),
        device=cost.get("device"),
        eval_split=record.get("eval_split"),
        eval_note=record.get("eval_note") or "",
        error_type=error.get("type"),
        error_message=str(message) if message is not None else None,
        finished=_timestamp(_mapping(record.get("timestamps")).get("finished")),
    )
    return row


def chance_score(record: Mapping[str, Any]) -> float:
    """The chance score of the record's main metric on its eval split (tasks.base.Task.chance): the record's own
    `chance` block, or, for a record written before runs recorded it, the same computed from its task's offline
    eval split; NaN where neither exists (a tuning trial, a hub data set, a task without a floor)."""
    main_metric = record.get("main_metric")
    if not main_metric:
        return math.nan
    if "chance" in record:
        return _number(_mapping(record.get("chance")).get(main_metric))
    task = _mapping(_mapping(record.get("config")).get("task"))
    if record.get("status") != "completed" or record.get("eval_split") in (None, "validation") or not task \
            or task.get("source", "offline") != "offline":
        return math.nan
    return _number(dict(_offline_chance(json.dumps(task, sort_keys=True))).get(main_metric))


@functools.lru_cache(maxsize=None)
def _offline_chance(task_config: str) -> tuple[tuple[str, float], ...]:
    """Task.chance of a task config's eval split (the task built from its `_target_`), once per config."""
    from hydra.utils import instantiate

    from tasks.base import Task

    try:
        task = instantiate(json.loads(task_config), _convert_="all")
    except Exception:  # noqa: BLE001 - a task this checkout cannot build has no floor to show
        return ()
    if not isinstance(task, Task) or type(task).chance is Task.chance:
        return ()  # composite tasks (merge, continual) and tasks without a floor: nothing to load
    return tuple(task.chance(task.examples("eval")).items())


def metric_directions(records: Iterable[Mapping[str, Any]]) -> dict[str, bool]:
    """Map each metric name to ``True`` when higher is better (first record that says wins)."""
    directions: dict[str, bool] = {}
    for record in records:
        for name, higher in _mapping(record.get("higher_is_better")).items():
            directions.setdefault(str(name), bool(higher))
    return directions


def records_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record (reruns of a ``cell_key`` collapsed), with flattened metrics and costs.

    ``df.attrs`` holds ``records_read`` (records before collapsing reruns) and
    ``higher_is_better`` (metric name -> bool).
    """
    records = list(records)
    rows = [_row(record) for record in latest_per_cell(records)]
    metric_columns = sorted({c for row in rows for c in row if c.startswith(METRIC_PREFIX)})
    columns = LEADING_COLUMNS + metric_columns + TRAILING_COLUMNS
    df = pd.DataFrame(rows, columns=columns)
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    df["finished"] = pd.to_datetime(df["finished"], utc=True)
    df.attrs["records_read"] = len(records)
    df.attrs["higher_is_better"] = metric_directions(records)
    return df.reset_index(drop=True)


def curves_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The training curves in long form: one row per logged step of each run cell (reruns collapsed).

    Columns are ``CURVE_KEYS`` followed by every numeric quantity the curves log (``loss``, ``lr``,
    ``grad_norm``, ...); a value that is missing or not a number is NaN. Entries without a numeric
    ``step`` are dropped.
    """
    rows: list[dict[str, Any]] = []
    quantities: dict[str, None] = {}
    for record in latest_per_cell(list(records)):
        curve = record.get("curve")
        if not isinstance(curve, list):
            continue
        head = {key: record.get(key) for key in CURVE_KEYS if key != "step"}
        for entry in curve:
            if not isinstance(entry, Mapping):
                continue
            step = _number(entry.get("step"))
            if math.isnan(step):
                continue
            row = dict(head, step=step)
            for name, value in entry.items():
                if name != "step":
                    quantities.setdefault(str(name))
                    row[str(name)] = _number(value)
            rows.append(row)
    df = pd.DataFrame(rows, columns=CURVE_KEYS + list(quantities))
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    return df

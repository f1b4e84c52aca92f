"""PEFT's method-comparison results as deltabench records, and back.

Hugging Face PEFT's method comparison (huggingface/peft, method_comparison/MetaMathQA; format read at
5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40) writes one JSON per run: `run_info` (experiment name, the training
parameters `train_config`, the `peft_config`), `train_info` (status, train time, accelerator memory, adapter file
size, trainable and total parameters, and `metrics`: one entry per eval step with `valid accuracy` and `train loss`,
the last with `test accuracy` and `forgetting`) and `meta_info` (package versions, the accelerator).

    python -m analysis import-peft DIR --results results/peft

writes one record per result file under `<results>/runs/`, so the leaderboard and the other reports read them
beside the suite's own. An imported record never passes for one of ours: its method is named
`peft/<experiment> (PEFT run)`, `source` says where it came from, `tuning.protocol` is `peft_metamath`, its eval
note names the hardware, and the leaderboard marks its rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.store import RunStore

PROTOCOL = "peft_metamath"
MARK = " (PEFT run)"  # appended to the method name of every imported record
TASK = "gsm8k"  # PEFT trains on MetaMathQA and tests on GSM8K's test split; deltabench's gsm8k task scores the same
MAIN_METRIC = "exact_match"  # deltabench's GSM8K metric; PEFT's "test accuracy" is the same exact-answer match


class NotAPeftResult(ValueError):
    """The file is JSON but not a PEFT method-comparison result."""


def is_peft_result(data: Any) -> bool:
    return isinstance(data, Mapping) and {"run_info", "train_info"} <= set(data) \
        and "experiment_name" in data["run_info"]


def to_record(data: Mapping[str, Any], file: str = "") -> dict[str, Any]:
    """One deltabench record (the store's schema) from one PEFT result."""
    if not is_peft_result(data):
        raise NotAPeftResult(f"{file or 'input'}: not a PEFT method-comparison result (needs run_info.experiment_name "
                             f"and train_info)")
    run, train = data["run_info"], data["train_info"]
    meta = data.get("meta_info") or {}
    packages = meta.get("package_info") or {}
    tc = run.get("train_config") or {}
    experiment = str(run["experiment_name"])
    model = str(tc.get("model_id") or "unknown").rsplit("/", 1)[-1]
    seed = int(tc.get("seed") or 0)
    entries = list(train.get("metrics") or [])
    final = next((e for e in reversed(entries) if "test accuracy" in e), {})
    valid = [e for e in entries if "valid accuracy" in e]
    accelerator = (meta.get("system_info") or {}).get("accelerator") or "unknown accelerator"
    status = {"success": "completed", "canceled": "failed", "cancelled": "failed"}.get(str(train.get("status")), "failed")
    metrics: dict[str, float] = {}
    if status == "completed" and "test accuracy" in final:
        metrics[MAIN_METRIC] = float(final["test accuracy"])
    if status == "completed" and "forgetting" in final:
        metrics["forgetting"] = float(final["forgetting"])
    key = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    max_steps = int(tc.get("max_steps") or 0)
    tokens = [float(e["tokens / sec"]) for e in entries if isinstance(e.get("tokens / sec"), (int, float))]
    created = run.get("created_at")
    return {
        "schema": 1,
        "id": f"{TASK}__peft-{experiment.replace('/', '-')}-imported__{model}__s{seed}__{key[:8]}",
        "cell_key": key, "config_hash": key, "status": status,
        "method": f"peft/{experiment}{MARK}", "task": TASK, "model": model, "suite": None, "seed": seed,
        "source": {"kind": "peft-method-comparison", "file": Path(file).name if file else None,
                   "experiment_name": experiment, "peft_branch": run.get("peft_branch"),
                   "accelerator": accelerator, "packages": packages,
                   "raw": {k: data[k] for k in ("run_info", "train_info", "meta_info") if k in data}},
        "config": {"method": dict(run.get("peft_config") or {}), "train": dict(tc)},
        "metrics": metrics, "main_metric": MAIN_METRIC,
        "higher_is_better": {MAIN_METRIC: True, "forgetting": False},
        "eval_split": "test",
        "eval_note": (f"imported from PEFT's method comparison (trained on MetaMathQA, GSM8K test accuracy), run on "
                      f"{accelerator} with peft {packages.get('peft-version', '?')}"),
        "curve": [{"step": int(e["step"]), "loss": float(e["train loss"])} for e in valid if "train loss" in e],
        "eval_history": [{"step": int(e["step"]), "metrics": {MAIN_METRIC: float(e["valid accuracy"])}}
                         for e in valid],
        "params": {"trainable": train.get("num_trainable_params"), "total": train.get("num_total_params"),
                   "adapter_bytes": train.get("file_size"), "model_source": tc.get("model_id")},
        "cost": {"train_s": train.get("train_time"),
                 "step_s": train["train_time"] / max_steps if train.get("train_time") and max_steps else None,
                 "tokens_per_s": sum(tokens) / len(tokens) if tokens else None, "eval_s": None,
                 "peak_mem_bytes": train.get("accelerator_memory_max"), "peak_mem_kind": "cuda_max_reserved",
                 "optimizer_state_bytes": None, "device": accelerator, "precision": tc.get("dtype"),
                 "steps": max_steps},
        "env": {name: packages.get(f"{name}-version") for name in ("peft", "transformers", "torch")},
        "artifacts": {},
        "timestamps": {"created": created, "started": created, "finished": created},
        "attempts": 1, "error": None if status == "completed" else {"type": "PeftRunFailed",
                                                                    "message": run.get("error_msg") or str(train.get("status"))},
        "tuning": {"protocol": PROTOCOL, "role": None, "study": None,
                   "budget": {"max_steps": max_steps, "batch_size": tc.get("batch_size"), "grad_accum": 1}},
    }


def to_peft_result(record: Mapping[str, Any]) -> dict[str, Any]:
    """PEFT's result JSON back from an imported record (the file it came from, as read)."""
    raw = (record.get("source") or {}).get("raw")
    if not raw:
        raise ValueError(f"{record.get('id')}: not an imported PEFT result (no source.raw)")
    return dict(raw)


def import_dir(source: Path, results: Path) -> tuple[list[Path], list[str]]:
    """Import every PEFT result JSON under `source` into `<results>/runs/`: (written records, skipped files with why)."""
    files = [source] if source.is_file() else sorted(source.rglob("*.json"))
    store, written, skipped = RunStore(results), [], []
    for file in files:
        try:
            data = json.loads(file.read_text())
            record = to_record(data, str(file))
        except (json.JSONDecodeError, NotAPeftResult, KeyError, TypeError, ValueError) as e:
            skipped.append(f"{file}: {e}")
            continue
        written.append(store.write(record))
    return written, skipped

"""Weights of a run for the ΔW analyses: the recorded ΔW, the pre-trained W0 it was added to, and W0's SVD.

A run writes ``<results>/runs/<run_id>/delta.safetensors`` ({layer name: ΔW}, fp32, out × in, names as in the
plain Hugging Face model, e.g. ``bert.encoder.layer.0.attention.self.query``). W0 is not stored: it is reloaded
from the record's model config with ``bench.models.load_model`` after ``bench.run.seed_everything(seed)``, which
reproduces the checkpoint of a pretrained model and the random initialisation of a ``source: random`` model.

Loaded base models and W0's SVDs are cached per process (several records share one base model), so analysing a
grid loads each base model once and decomposes each pre-trained layer once.

    deltas = load_deltas(run_dir)                         # {name: ΔW (m, n)}
    w0 = load_base_weights(record, deltas)                # {name: W0 (m, n)}
    u0, s0, vh0 = base_svd(record, name)                  # thin SVD of W0, cached
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import Tensor

from analysis.records import NoRecordsError, RecordWarning, latest_per_cell, require_records

__all__ = [
    "BaseSVD",
    "DELTA_FIX",
    "MissingDeltaError",
    "NoRecordsError",
    "as_matrix",
    "base_svd",
    "clear_caches",
    "completed_records",
    "fresh_base_model",
    "load_adapter",
    "load_base_model",
    "load_base_weights",
    "load_deltas",
    "load_record",
    "method_rank",
    "model_key",
    "records_with_deltas",
    "run_dir_of",
]

#: How to get the ΔW file of a run that lacks one.
DELTA_FIX = (
    "rerun the cell with record.save_delta=true (it is the default), e.g. "
    "`python -m bench <the run's overrides> record.save_delta=true force=true`"
)
ADAPTER_FIX = (
    "rerun the cell with record.save_adapter=true (it is the default), e.g. "
    "`python -m bench <the run's overrides> record.save_adapter=true force=true`"
)
RECORD = "record.json"
DELTA_FILE = "delta.safetensors"
ADAPTER_FILE = "adapter.safetensors"


class MissingDeltaError(FileNotFoundError):
    """A run has no ΔW file (it ran with record.save_delta=false, or is not completed)."""


# ------------------------------------------------------------------------------------------- records


def run_dir_of(results_dir: Path | str, record: Mapping[str, Any]) -> Path:
    """``<results_dir>/runs/<record id>``: where the run's record and artifacts live."""
    return Path(results_dir) / "runs" / str(record["id"])


def load_record(run_dir: Path | str) -> dict[str, Any]:
    """The parsed ``record.json`` of a run directory."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"no {RECORD} in {run_dir}: not a run directory")
    return json.loads(path.read_text(encoding="utf-8"))


def completed_records(results_dir: Path | str) -> list[dict[str, Any]]:
    """Completed records under ``results_dir`` (reruns of a cell collapsed to the newest), sorted by id.

    Raises ``NoRecordsError`` when there is no record, or no completed one.
    """
    records, _ = require_records(Path(results_dir))
    done = [dict(r) for r in latest_per_cell(records) if r.get("status") == "completed" and r.get("id")]
    if not done:
        statuses = sorted({str(r.get("status")) for r in records})
        raise NoRecordsError(
            f"no completed run record in {Path(results_dir) / 'runs'} ({len(records)} records, statuses: "
            f"{', '.join(statuses)}); run `python -m bench` to completion first"
        )
    return sorted(done, key=lambda r: str(r["id"]))


def records_with_deltas(results_dir: Path | str) -> list[tuple[dict[str, Any], Path]]:
    """Completed records whose run directory holds a ΔW file, with that directory.

    A completed record without a ΔW file is skipped with a ``RecordWarning`` naming the fix; when no record
    has one, ``MissingDeltaError`` is raised. Raises ``NoRecordsError`` when there is no completed record.
    """
    found: list[tuple[dict[str, Any], Path]] = []
    missing: list[str] = []
    for record in completed_records(results_dir):
        run_dir = run_dir_of(results_dir, record)
        if _delta_path(run_dir, record).is_file():
            found.append((record, run_dir))
        else:
            missing.append(str(record["id"]))
    if missing and found:
        warnings.warn(
            f"skipping {len(missing)} completed run(s) without {DELTA_FILE} ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); to analyse them, {DELTA_FIX}",
            RecordWarning,
            stacklevel=2,
        )
    if not found:
        raise MissingDeltaError(
            f"none of the {len(missing)} completed run(s) in {Path(results_dir) / 'runs'} has a {DELTA_FILE} "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); {DELTA_FIX}"
        )
    return found


def method_rank(record: Mapping[str, Any]) -> int | None:
    """``config.method.r`` (the adapter rank) when the method has one, else None (e.g. full fine-tuning)."""
    method_cfg = (record.get("config") or {}).get("method") or {}
    r = method_cfg.get("r") if isinstance(method_cfg, Mapping) else None
    return int(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else None


# ------------------------------------------------------------------------------------------- ΔW, adapter


def _delta_path(run_dir: Path, record: Mapping[str, Any] | None = None) -> Path:
    artifacts = (record or {}).get("artifacts") or {}
    return run_dir / str(artifacts.get("delta") or DELTA_FILE)


def load_deltas(run_dir: Path | str) -> dict[str, Tensor]:
    """{layer name: ΔW} of a run, fp32 on the CPU, each (m, n) = (out, in), names as in the plain HF model.

    Raises ``MissingDeltaError`` (naming the fix: ``record.save_delta=true``) when the run has no ΔW file.
    """
    run_dir = Path(run_dir)
    record = load_record(run_dir) if (run_dir / RECORD).is_file() else None
    path = _delta_path(run_dir, record)
    if not path.is_file():
        raise MissingDeltaError(f"run {run_dir.name} has no {path.name} in {run_dir}; {DELTA_FIX}")
    return {name: t.float() for name, t in sorted(load_file(str(path)).items())}


def load_adapter(run_dir: Path | str) -> dict[str, Tensor]:
    """The run's trainable tensors (adapter + task head) as saved by ``Method.adapter_state_dict``."""
    run_dir = Path(run_dir)
    record = load_record(run_dir) if (run_dir / RECORD).is_file() else {}
    path = run_dir / str((record.get("artifacts") or {}).get("adapter") or ADAPTER_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"run {run_dir.name} has no {path.name} in {run_dir}; {ADAPTER_FIX}")
    return load_file(str(path))


def as_matrix(w: Tensor) -> Tensor:
    """A weight as a matrix (out, rest): Linear weights unchanged, conv kernels flattened per output channel."""
    return w if w.ndim == 2 else w.reshape(w.shape[0], -1)


# ------------------------------------------------------------------------------------------- base model

@dataclass(frozen=True)
class BaseSVD:
    """Thin SVD of a pre-trained weight, W0 = U diag(S) Vh, in fp32.

    Attributes:
        u: (m, p) left singular vectors, p = min(m, n), by decreasing singular value.
        s: (p,) singular values.
        vh: (p, n) right singular vectors (rows).
    """

    u: Tensor
    s: Tensor
    vh: Tensor


_BASE_MODELS: dict[str, Any] = {}  # model key -> bench.models.LoadedModel (never modified)
_BASE_SVDS: dict[tuple[str, str], BaseSVD] = {}  # (model key, layer) -> SVD of W0


def model_key(record: Mapping[str, Any]) -> str:
    """What the base weights depend on: the model config, plus seed and task for randomly initialised models.

    A pretrained model's adapted layers come from its checkpoint, so every record with the same model config
    shares one base model. A ``source: random`` model's weights are drawn after ``seed_everything(seed)``, with
    the task's head on top, so those are part of the key.
    """
    config = record.get("config") or {}
    model_cfg = config.get("model")
    if not isinstance(model_cfg, Mapping):
        raise ValueError(f"record {record.get('id')} has no config.model; cannot reload its base model")
    key: dict[str, Any] = {"model": model_cfg}
    if model_cfg.get("source") == "random":
        key.update(seed=record.get("seed"), task=config.get("task"))
    return json.dumps(key, sort_keys=True, default=str)


def load_base_model(record: Mapping[str, Any]) -> Any:
    """The pre-trained model (with the task's freshly initialised head) the run started from, cached.

    Returns a ``bench.models.LoadedModel``; its ``.model`` is shared by the cache: deep-copy it before changing
    any weight (``copy.deepcopy(load_base_model(record).model)``).
    """
    from bench.models import load_model  # deferred: imports transformers
    from bench.run import seed_everything

    key = model_key(record)
    if key not in _BASE_MODELS:
        config = record["config"]
        task = instantiate(OmegaConf.create(dict(config["task"])), _convert_="all")  # for the head spec only
        seed_everything(int(record.get("seed") or 0))
        loaded = load_model(OmegaConf.create(dict(config["model"])), task.head)
        loaded.model.eval()
        loaded.model.requires_grad_(False)
        _BASE_MODELS[key] = loaded
    return _BASE_MODELS[key]


def fresh_base_model(record: Mapping[str, Any]) -> Any:
    """A private copy of the cached base ``LoadedModel`` whose weights may be changed."""
    loaded = load_base_model(record)
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model), head_modules=list(loaded.head_modules))


def load_base_weights(record: Mapping[str, Any], names: Iterable[str]) -> dict[str, Tensor]:
    """{name: W0} of the named layers of the run's base model: fp32 CPU copies, each (m, n) = (out, in)."""
    model = load_base_model(record).model
    weights: dict[str, Tensor] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise KeyError(
                f"layer {name!r} of run {record.get('id')} is not in its base model "
                f"({type(model).__name__}); was the record written with another model config?"
            ) from exc
        weights[name] = module.weight.detach().to("cpu", torch.float32).clone()  # (m, n)
    return weights


def base_svd(record: Mapping[str, Any], name: str) -> BaseSVD:
    """Thin SVD of W0 of one layer in fp32, cached per (base model, layer)."""
    key = (model_key(record), name)
    if key not in _BASE_SVDS:
        w0 = as_matrix(load_base_weights(record, [name])[name])  # (m, n)
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)  # (m, p), (p,), (p, n)
        _BASE_SVDS[key] = BaseSVD(u=u, s=s, vh=vh)
    return _BASE_SVDS[key]


def clear_caches() -> None:
    """Forget the cached base models and SVDs (frees their memory)."""
    _BASE_MODELS.clear()
    _BASE_SVDS.clear()

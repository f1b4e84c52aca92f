"""Experiment trackers: optional mirrors of a run in Weights & Biases or MLflow (`tracker=wandb`, `tracker=mlflow`).

The JSON record (bench/store.py) stays the source of truth: a tracker only copies what the run reports into a
tool people like to browse. It never decides anything, and its failures never touch the record: `SafeTracker`
(what `make_tracker` returns) turns every exception of a tracker into a warning and goes on without it.

    tracker = make_tracker(cfg.get("tracker"), results_dir=cfg.results_dir)   # NoTracker when none is configured
    tracker.start(run_id, record["config"], {"method": "lora", ...}, run_dir=run_dir)
    tracker.on_log(step, row)    # a curve row {step, loss, lr, grad_norm} or an eval row {step, metrics}
    tracker.finish(record)       # after the record is written: final metrics, costs, status (and record.json)

Each attempt of a cell (a rerun after a failure, a resume after preemption, `force=true`) is one tracker run,
named after the run id and tagged with its attempt; the record holds the whole curve of a resumed run, a tracker
only what the attempt itself logged.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.trackers")

INSTALL_HINT = "pip install 'deltabench[trackers]'"


# ------------------------------------------------------------------------------------------ the interface
class Tracker(ABC):
    """What the run tells a tracker: start, then metrics per step, then the finished record."""

    @abstractmethod
    def start(self, run_id: str, config: dict[str, Any], tags: dict[str, str], run_dir: Path | None = None) -> None:
        """Open a tracker run for one attempt of `run_id`: `config` is the resolved Hydra config, `tags` short
        facts about the cell (method, task, model, seed, cell_key, attempt), `run_dir` the record's folder."""

    @abstractmethod
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Scalar metrics at optimizer step `step` (steps never decrease)."""

    @abstractmethod
    def finish(self, record: dict[str, Any]) -> None:
        """Close the run with the record as written: its status, final metrics, parameter counts and costs."""


class NoTracker(Tracker):
    """`tracker=none`: the record alone."""

    def __init__(self, results_dir: str | Path | None = None) -> None:
        pass

    def start(self, run_id: str, config: dict[str, Any], tags: dict[str, str], run_dir: Path | None = None) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def finish(self, record: dict[str, Any]) -> None:
        pass


# ------------------------------------------------------------------------------------------ shared helpers
def row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A record row as tracker metrics: a curve row {step, loss, lr, grad_norm} → train/loss, train/lr, ...;
    an eval_history row {step, metrics: {...}} → eval/<metric>. Non-numbers are left out."""
    if "metrics" in row:
        return {f"eval/{k}": float(v) for k, v in row["metrics"].items() if _is_number(v)}
    return {f"train/{k}": float(v) for k, v in row.items() if k != "step" and _is_number(v)}


def summary_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The finished record flattened for a run summary: final/<metric>, params/<key>, cost/<key>, plus status
    and main metric. Values are numbers or short strings; None is left out."""
    out: dict[str, Any] = {"status": record.get("status"), "main_metric": record.get("main_metric")}
    for prefix, section in (("final", "metrics"), ("params", "params"), ("cost", "cost")):
        for k, v in (record.get(section) or {}).items():
            out[f"{prefix}/{k}"] = v
    main = record.get("main_metric")
    if main and main in (record.get("metrics") or {}):
        out["final/main"] = record["metrics"][main]
    if record.get("error"):
        out["error"] = f"{record['error'].get('type')}: {record['error'].get('message')}"[:1000]
    return {k: v for k, v in out.items() if v is not None and (_is_number(v) or isinstance(v, str))}


def final_step(record: Mapping[str, Any]) -> int:
    """The step the final metrics belong to: the last step trained."""
    steps = (record.get("cost") or {}).get("steps")
    if isinstance(steps, int) and steps > 0:
        return steps
    curve = record.get("curve") or []
    return int(curve[-1]["step"]) if curve else 0


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} → {"train.lr": 1e-3}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------ the guard
class SafeTracker(Tracker):
    """Wraps a tracker so that nothing it raises reaches the run: each failure is one warning (with the
    traceback at debug level). A failed start disables the tracker; a failed log stops logging but still lets
    finish close the run. finish runs at most once (the run calls it before re-raising a preemption signal and
    again in its `finally`)."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.name = type(tracker).__name__
        self.started = self.logging = self.finished = False

    def _guard(self, what: str, fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001  (a tracker must never fail the run; Ctrl-C still does)
            log.warning("%s.%s failed: %s: %s; the run goes on without it (the JSON record is unaffected)",
                        self.name, what, type(e).__name__, e)
            log.debug("%s.%s traceback", self.name, what, exc_info=True)
            return False

    def start(self, run_id: str, config: dict[str, Any], tags: dict[str, str], run_dir: Path | None = None) -> None:
        self.started = self.logging = self._guard("start", self.tracker.start, run_id, config, tags, run_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logging and metrics:
            self.logging = self._guard("log", self.tracker.log, step, metrics)

    def on_log(self, step: int, row: Mapping[str, Any]) -> None:
        """The train loop's callback: a curve row or an eval_history row, as appended to the result."""
        self.log(step, row_metrics(row))

    def finish(self, record: dict[str, Any]) -> None:
        if self.started and not self.finished:
            self.finished = True
            self._guard("finish", self.tracker.finish, record)


def make_tracker(node: Any, results_dir: str | Path) -> SafeTracker:
    """The tracker of conf/tracker/<name>.yaml (`cfg.tracker`), guarded; NoTracker when the key is absent or
    null. A missing package or a wrong key raises here, before any training (a configuration error)."""
    if node is None or (isinstance(node, Mapping) and not node.get("_target_")):
        return SafeTracker(NoTracker())
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return SafeTracker(instantiate(node, _convert_="all", results_dir=str(results_dir)))
    except InstantiationException as e:  # the constructor's own message (a missing package, a bad value)
        raise (e.__cause__ or e)


def _require(module: str, tracker: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"tracker={tracker} needs the `{module}` package, which is not installed: "
                          f"{INSTALL_HINT} (or set tracker=none)") from e


# ------------------------------------------------------------------------------------------ Weights & Biases
class WandbTracker(Tracker):
    """`tracker=wandb`: a W&B run per attempt, its files in <run dir>/wandb (`wandb sync` uploads an offline one).
    The run is named after the run id; W&B draws its own unique id (a cell's attempts, or the same cell run into
    another results_dir, never collide in a project).

    Offline unless the user set WANDB_MODE (or `mode`); online needs an API key (`wandb login` or WANDB_API_KEY).
    Config: the resolved Hydra config plus `cell` (the tags). History: train/loss, train/lr, train/grad_norm every
    train.log_every steps, eval/<metric> at every evaluation including the final one. Summary: the record's
    final/<metric>, params/<key>, cost/<key>, status, main_metric.
    """

    def __init__(self, project: str = "deltabench", entity: str | None = None, mode: str | None = None,
                 group: str | None = None, job_type: str | None = None, tags: Sequence[str] = (),
                 notes: str | None = None, settings: Mapping[str, Any] | None = None,
                 results_dir: str | Path = "results") -> None:
        self.wandb = _require("wandb", "wandb")
        if mode is not None and mode not in ("online", "offline", "disabled", "shared"):
            raise ValueError(f"tracker.mode must be online, offline, disabled, shared or null; got {mode!r}")
        self.project, self.entity, self.mode, self.group, self.job_type = project, entity, mode, group, job_type
        self.tags, self.notes, self.settings = list(tags), notes, dict(settings or {})
        self.results_dir = Path(results_dir)
        self.run: Any = None

    def resolved_mode(self) -> str:
        """`mode`, else WANDB_MODE, else offline."""
        return self.mode or os.environ.get("WANDB_MODE") or "offline"

    def start(self, run_id: str, config: dict[str, Any], tags: dict[str, str], run_dir: Path | None = None) -> None:
        directory = Path(run_dir) if run_dir is not None else self.results_dir
        directory.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=self.project, entity=self.entity, mode=self.resolved_mode(), group=self.group,
            job_type=self.job_type, notes=self.notes, dir=str(directory), name=run_id,
            tags=[*self.tags, *(f"{k}={v}"[:64] for k, v in tags.items())],
            config={**config, "cell": dict(tags)}, reinit="create_new",
            settings=self.wandb.Settings(**self.settings) if self.settings else None,
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, record: dict[str, Any]) -> None:
        try:
            final = {f"eval/{k}": v for k, v in (record.get("metrics") or {}).items() if _is_number(v)}
            if final:
                self.run.log(final, step=final_step(record))
            self.run.summary.update(summary_of(record))
        finally:
            self.run.finish(exit_code=0 if record.get("status") == "completed" else 1)
            self.run = None


# ------------------------------------------------------------------------------------------ MLflow
class MlflowTracker(Tracker):
    """`tracker=mlflow`: an MLflow run per attempt, in experiment `experiment_name`.

    The store: `tracking_uri`, else MLFLOW_TRACKING_URI, else SQLite at <results_dir>/mlflow.db with artifacts
    in <results_dir>/mlartifacts (browse with `mlflow ui --backend-store-uri sqlite:///results/mlflow.db`).
    SQLite takes one writer at a time: for a cluster grid point MLFLOW_TRACKING_URI at a tracking server.
    Params: the flattened resolved config (train.max_steps, method.r, ...). Metrics: train/loss, train/lr,
    train/grad_norm, eval/<metric> per step; final/<metric>, params/<key>, cost/<key> at the last step. Tags: the
    cell (method, task, model, seed, cell_key, attempt), `tags`, status and the numbers' string companions.
    Artifact: the run's record.json. Run status: FINISHED if completed, KILLED if preempted, else FAILED.
    """

    STATUS = {"completed": "FINISHED", "preempted": "KILLED"}

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None,
                 artifact_location: str | None = None, tags: Mapping[str, Any] | None = None,
                 results_dir: str | Path = "results") -> None:
        self.mlflow = _require("mlflow", "mlflow")
        self.results_dir = Path(results_dir)
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or self.default_uri()
        self.experiment_name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "deltabench"
        if artifact_location is None and self.tracking_uri == self.default_uri():
            artifact_location = (self.results_dir.resolve() / "mlartifacts").as_uri()
        self.artifact_location = artifact_location
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}  # str values, as MLflow wants
        self.client: Any = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None

    def default_uri(self) -> str:
        return "sqlite:///" + str(self.results_dir.resolve() / "mlflow.db")

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
        except MlflowException:  # another process created it in between
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, run_id: str, config: dict[str, Any], tags: dict[str, str], run_dir: Path | None = None) -> None:
        from mlflow.entities import Param

        if self.tracking_uri == self.default_uri():
            self.results_dir.mkdir(parents=True, exist_ok=True)
        self.client = self.mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        run = self.client.create_run(self._experiment_id(), run_name=run_id,
                                     tags={_key(k): str(v) for k, v in {**self.tags, **tags, "run_id": run_id}.items()})
        self.run_id, self.run_dir = run.info.run_id, run_dir
        params = [Param(_key(k), _param_value(v)) for k, v in flatten(config).items()]
        self.client.log_batch(self.run_id, params=params)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._log_metrics(step, metrics)

    def _log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_key(k), float(v), now, int(step))
                                                    for k, v in metrics.items() if _is_number(v)])

    def finish(self, record: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        try:
            summary = summary_of(record)
            step = final_step(record)
            final = {f"eval/{k}": v for k, v in (record.get("metrics") or {}).items() if _is_number(v)}
            self._log_metrics(step, {**final, **{k: v for k, v in summary.items() if _is_number(v)}})
            strings = {k: v for k, v in summary.items() if isinstance(v, str)}
            self.client.log_batch(self.run_id, tags=[RunTag(_key(k), v[:8000]) for k, v in strings.items()])
            path = self.run_dir / "record.json" if self.run_dir is not None else None
            if path is not None and path.is_file():
                self.client.log_artifact(self.run_id, str(path))
            else:
                self.client.log_text(self.run_id, json.dumps(record, indent=1, default=str), "record.json")
        finally:
            self.client.set_terminated(self.run_id, self.STATUS.get(str(record.get("status")), "FAILED"))
            self.run_id = None


def _key(k: str) -> str:
    """An MLflow-safe name: alphanumerics, _ - . / space; at most 250 characters."""
    return re.sub(r"[^\w.\-/ ]", "_", k)[:250]


def _param_value(v: Any) -> str:
    """A config value as MLflow param text: strings as they are, the rest as JSON (null, true, 0.0001, [1, 2])."""
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text[:6000]

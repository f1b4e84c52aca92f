"""Trackers (bench/trackers.py): W&B offline and MLflow on SQLite really hold what the run logged, read back with
their own formats; a tracker that raises never stops a run from writing its record."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from bench.store import RunStore
from bench.trackers import (INSTALL_HINT, MlflowTracker, NoTracker, SafeTracker, Tracker, WandbTracker, make_tracker,
                            row_metrics, summary_of)
from tests.helpers import CONF, REPO

RUN_ID = "glue-rte__lora__tiny_bert__s0__0123abcd"
CONFIG = {"seed": 0, "train": {"max_steps": 6, "log_every": 2}, "method": {"_target_": "methods.lora.LoRA", "r": 8,
                                                                          "target_modules": ["query", "value"]}}
TAGS = {"method": "lora", "task": "glue/rte", "model": "tiny_bert", "seed": "0", "cell_key": "0123abcd", "attempt": "1"}
CURVE = [{"step": s, "loss": 1.0 / s, "lr": 1e-3 * s, "grad_norm": 0.5 + s} for s in (1, 2, 4, 6)]
EVAL = [{"step": 4, "metrics": {"accuracy": 0.625, "f1": 0.5}}]


def tracker_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user tracker settings leak in, and W&B's own caches stay in tmp_path."""
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_API_KEY",
                "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def record_for(run_id: str = RUN_ID, status: str = "completed") -> dict[str, Any]:
    return {"id": run_id, "status": status, "config": CONFIG, "main_metric": "accuracy", "curve": CURVE,
            "eval_history": EVAL, "metrics": {"accuracy": 0.75, "f1": 0.7},
            "params": {"trainable": 1234, "total": 99999, "adapter_bytes": 4936, "model_source": "random"},
            "cost": {"train_s": 3.5, "step_s": 0.5, "peak_mem_bytes": 10 ** 9, "device": "cpu", "steps": 6},
            "error": None}


def simulate_run(tracker: Tracker, results_dir: Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """What bench/run.py does with a tracker: record written, start, a row per curve/eval point, record written
    again in `finally`, then finish."""
    store = RunStore(results_dir)
    record = record or record_for()
    store.write({**record, "status": "running"})
    guarded = tracker if isinstance(tracker, SafeTracker) else SafeTracker(tracker)
    guarded.start(record["id"], record["config"], TAGS, run_dir=store.run_dir(record["id"]))
    rows = sorted([*CURVE, *EVAL], key=lambda r: (r["step"], "metrics" in r))
    for row in rows:
        guarded.on_log(row["step"], row)
    store.write(record)
    guarded.finish(record)
    return record


# ------------------------------------------------------------------------------------------ the shared pieces
def test_rows_become_train_and_eval_metrics():
    assert row_metrics({"step": 2, "loss": 0.5, "lr": 1e-3, "grad_norm": 2.0}) == \
        {"train/loss": 0.5, "train/lr": 1e-3, "train/grad_norm": 2.0}
    assert row_metrics({"step": 4, "metrics": {"accuracy": 0.5, "note": "x"}}) == {"eval/accuracy": 0.5}
    summary = summary_of(record_for())
    assert summary["final/accuracy"] == 0.75 and summary["final/main"] == 0.75
    assert summary["cost/train_s"] == 3.5 and summary["params/trainable"] == 1234
    assert summary["status"] == "completed" and summary["cost/device"] == "cpu"


def test_no_tracker_when_absent_or_none():
    assert isinstance(make_tracker(None, "results").tracker, NoTracker)
    none = OmegaConf.load(CONF / "tracker" / "none.yaml")
    assert isinstance(make_tracker(none, "results").tracker, NoTracker)


def test_every_tracker_yaml_key_is_commented():
    for path in (CONF / "tracker").glob("*.yaml"):
        for line in path.read_text().splitlines():
            if line and not line.startswith(("#", " ", "_target_")):
                assert "#" in line, f"{path.name}: `{line}` has no comment"


# ------------------------------------------------------------------------------------------ W&B
def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of
    chunks, each with a 7-byte header: CRC32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a .wandb file"
    out, i, pending = [], 7, b""
    while i + 7 <= len(data):
        left = block - i % block
        if left < 7:  # the block's tail is padding
            i += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[i:i + 7])
        if kind == 0:
            i += left
            continue
        chunk, i = data[i + 7:i + 7 + n], i + 7 + n
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_wandb_run(run_dir: Path) -> dict[str, Any]:
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run, history, summary, exit_code = None, [], {}, None
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "history":
            history.append(_items(rec.history.item))
        elif kind == "summary":
            summary.update(_items(rec.summary.update))
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    assert run is not None
    return {"path": path, "run": run, "config": {u.key: json.loads(u.value_json) for u in run.config.update},
            "history": history, "summary": summary, "exit_code": exit_code}


def test_wandb_offline_run_files_hold_the_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    tracker_env(monkeypatch, tmp_path)
    tracker = make_tracker(OmegaConf.load(CONF / "tracker" / "wandb.yaml"), results_dir=tmp_path)
    assert isinstance(tracker.tracker, WandbTracker) and tracker.tracker.resolved_mode() == "offline"
    record = simulate_run(tracker, tmp_path)
    assert tracker.started and tracker.logging and tracker.finished
    wandb.teardown()  # run.finish() may return before wandb-core has flushed the .wandb file; process exit waits

    got = read_wandb_run(RunStore(tmp_path).run_dir(RUN_ID))
    assert got["run"].display_name == RUN_ID and got["run"].project == "deltabench"
    assert set(got["run"].tags) >= {"method=lora", "task=glue/rte", "attempt=1"}
    assert got["config"]["train"] == CONFIG["train"] and got["config"]["cell"] == TAGS
    losses = [(h["_step"], h["train/loss"]) for h in got["history"] if "train/loss" in h]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in CURVE]
    evals = [(h["_step"], h["eval/accuracy"]) for h in got["history"] if "eval/accuracy" in h]
    assert evals == [(4, 0.625), (6, 0.75)]  # the in-training evaluation, then the final one at the last step
    assert got["summary"]["final/accuracy"] == 0.75 and got["summary"]["cost/train_s"] == 3.5
    assert got["summary"]["params/trainable"] == 1234 and got["summary"]["status"] == "completed"
    assert got["exit_code"] == 0
    assert record["status"] == "completed"


def test_wandb_mode_follows_the_environment_unless_set(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert WandbTracker().resolved_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert WandbTracker().resolved_mode() == "online"
    assert WandbTracker(mode="disabled").resolved_mode() == "disabled"
    with pytest.raises(ValueError, match="mode"):
        WandbTracker(mode="cloud")


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow", None)
    for name in ("wandb", "mlflow"):
        with pytest.raises(ImportError, match=r"deltabench\[trackers\]") as e:
            make_tracker(OmegaConf.load(CONF / "tracker" / f"{name}.yaml"), results_dir="results")
        assert INSTALL_HINT in str(e.value) and f"tracker={name}" in str(e.value)


# ------------------------------------------------------------------------------------------ MLflow
def test_mlflow_sqlite_store_holds_params_metrics_and_the_record(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    tracker_env(monkeypatch, tmp_path)
    tracker = make_tracker(OmegaConf.load(CONF / "tracker" / "mlflow.yaml"), results_dir=tmp_path)
    assert isinstance(tracker.tracker, MlflowTracker)
    assert tracker.tracker.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    simulate_run(tracker, tmp_path)
    assert tracker.started and tracker.logging and tracker.finished

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("deltabench")
    assert experiment.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == RUN_ID and run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["train.max_steps"] == "6" and params["method.r"] == "8" and params["seed"] == "0"
    assert params["method._target_"] == "methods.lora.LoRA" and params["method.target_modules"] == '["query", "value"]'
    assert tags["method"] == "lora" and tags["task"] == "glue/rte" and tags["attempt"] == "1"
    assert tags["status"] == "completed" and tags["cost/device"] == "cpu"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"])) for r in CURVE]
    evals = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert sorted((m.step, m.value) for m in evals) == [(4, 0.625), (6, 0.75)]
    assert metrics["final/accuracy"] == 0.75 and metrics["cost/train_s"] == 3.5 and metrics["params/trainable"] == 1234
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["record.json"]
    local = client.download_artifacts(run.info.run_id, "record.json", str(tmp_path / "download"))
    on_disk = RunStore(tmp_path).run_dir(RUN_ID) / "record.json"
    assert Path(local).read_text() == on_disk.read_text()
    assert json.loads(Path(local).read_text())["metrics"] == {"accuracy": 0.75, "f1": 0.7}


def test_mlflow_store_follows_the_environment_unless_set(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    t = MlflowTracker(results_dir=tmp_path)
    assert t.tracking_uri == f"sqlite:///{tmp_path}/elsewhere.db" and t.experiment_name == "mine"
    assert t.artifact_location is None  # a store the user chose keeps its own artifact root
    t = MlflowTracker(tracking_uri="http://127.0.0.1:5000", experiment_name="x", results_dir=tmp_path)
    assert t.tracking_uri == "http://127.0.0.1:5000" and t.experiment_name == "x"


@pytest.mark.parametrize(("status", "mlflow_status"), [("diverged", "FAILED"), ("preempted", "KILLED")])
def test_unfinished_run_gets_its_status_in_mlflow(tmp_path, monkeypatch, status, mlflow_status):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    tracker_env(monkeypatch, tmp_path)
    record = {**record_for(status=status), "metrics": {}, "cost": {},
              "error": {"type": status, "message": f"training {status} at step 3"}}
    simulate_run(make_tracker(OmegaConf.load(CONF / "tracker" / "mlflow.yaml"), results_dir=tmp_path), tmp_path, record)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("deltabench").experiment_id])
    assert run.info.status == mlflow_status and run.data.tags["status"] == status
    assert f"training {status}" in run.data.tags["error"]
    assert "final/accuracy" not in run.data.metrics


# ------------------------------------------------------------------------------------------ failures
class ExplodingTracker(Tracker):
    """Raises in whichever hooks `fail` names (all by default); counts the calls it received."""

    def __init__(self, fail: tuple[str, ...] = ("start", "log", "finish"), results_dir: Any = None) -> None:
        self.fail, self.calls = tuple(fail), {"start": 0, "log": 0, "finish": 0}

    def _hook(self, name: str) -> None:
        self.calls[name] += 1
        if name in self.fail:
            raise RuntimeError(f"tracker {name} exploded")

    def start(self, run_id: str, config: dict[str, Any], tags: dict[str, str], run_dir: Path | None = None) -> None:
        self._hook("start")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._hook("log")

    def finish(self, record: dict[str, Any]) -> None:
        self._hook("finish")


@pytest.mark.parametrize("fail", [("start",), ("log",), ("finish",), ("start", "log", "finish")])
def test_a_raising_tracker_never_costs_the_record(tmp_path, caplog, fail):
    inner = ExplodingTracker(fail)
    with caplog.at_level(logging.WARNING, logger="bench.trackers"):
        record = simulate_run(inner, tmp_path)  # nothing propagates
    assert RunStore(tmp_path).read(RUN_ID) == json.loads(json.dumps(record))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("ExplodingTracker" in w and "exploded" in w for w in warnings)
    assert len(warnings) == 1  # the first failure disables what follows it (finish aside)
    if "start" in fail:  # a tracker that did not start gets nothing more
        assert inner.calls == {"start": 1, "log": 0, "finish": 0}
    elif "log" in fail:  # one failed log stops logging; finish still closes the run
        assert inner.calls == {"start": 1, "log": 1, "finish": 1}
    else:
        assert inner.calls == {"start": 1, "log": len(CURVE) + len(EVAL), "finish": 1}


def test_finish_runs_once(tmp_path):
    inner = ExplodingTracker(fail=())
    guarded = SafeTracker(inner)
    guarded.start(RUN_ID, CONFIG, TAGS, run_dir=tmp_path)
    guarded.finish(record_for(status="preempted"))
    guarded.finish(record_for(status="preempted"))  # run.py: before passing the signal on, and in `finally`
    assert inner.calls["finish"] == 1


def test_keyboard_interrupt_is_not_swallowed(tmp_path):
    class Interrupted(ExplodingTracker):
        def log(self, step: int, metrics: dict[str, float]) -> None:
            raise KeyboardInterrupt

    guarded = SafeTracker(Interrupted(fail=()))
    guarded.start(RUN_ID, CONFIG, TAGS, run_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        guarded.on_log(1, CURVE[0])


# ------------------------------------------------------------------------------------------ the command line
def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(WANDB_SILENT="true", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               **{v: str(tmp_path / "wandb-home" / v.lower()) for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                                       "WANDB_DATA_DIR")})
    return subprocess.run([sys.executable, "-m", "bench", "+experiment=smoke", "+model=tiny_bert", "method=lora",
                           "task=glue/rte", "train.eval_every=4", f"results_dir={tmp_path}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def the_record(tmp_path: Path) -> dict[str, Any]:
    (path,) = (tmp_path / "runs").glob("*/record.json")
    return json.loads(path.read_text())


def test_cli_mlflow_run_mirrors_the_record(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    out = bench(tmp_path, "tracker=mlflow")
    assert out.returncode == 0, out.stderr[-3000:]
    record = the_record(tmp_path)
    assert record["status"] == "completed" and record["config"]["tracker"]["_target_"].endswith("MlflowTracker")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("deltabench").experiment_id])
    assert run.info.run_name == record["id"] and run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "6" and run.data.tags["method"] == "lora"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"])) for r in record["curve"]]
    evals = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert sorted(m.step for m in evals) == [4, 6]  # train.eval_every=4, then the final evaluation
    assert run.data.metrics["final/accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    local = client.download_artifacts(run.info.run_id, "record.json", str(tmp_path / "download"))
    assert json.loads(Path(local).read_text()) == record


def test_cli_wandb_run_writes_offline_files(tmp_path):
    pytest.importorskip("wandb")
    out = bench(tmp_path, "tracker=wandb")
    assert out.returncode == 0, out.stderr[-3000:]
    record = the_record(tmp_path)
    assert record["status"] == "completed"
    got = read_wandb_run(tmp_path / "runs" / record["id"])
    losses = [(h["_step"], h["train/loss"]) for h in got["history"] if "train/loss" in h]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in record["curve"]]
    assert got["summary"]["final/accuracy"] == pytest.approx(record["metrics"]["accuracy"])
    assert got["config"]["train"]["max_steps"] == 6 and got["exit_code"] == 0


def test_cli_a_raising_tracker_still_completes_the_run(tmp_path):
    out = bench(tmp_path, "tracker._target_=tests.bench.test_trackers.ExplodingTracker")
    assert out.returncode == 0, out.stderr[-3000:]
    assert the_record(tmp_path)["status"] == "completed"
    assert "ExplodingTracker.start failed" in out.stderr + out.stdout

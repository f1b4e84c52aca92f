"""The results store: atomic writes, idempotent reruns, records of failures and divergence."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from bench.run import run
from bench.store import RunStore, atomic_write_json
from methods.lora import LoRA
from tests.helpers import compose_cfg


def _writer(path: str, n: int, tag: int = 0, go=None, ready=None) -> None:
    if go is not None:  # start together: the writes overlap
        ready.release()
        go.wait()
    for i in range(n):
        atomic_write_json(Path(path), {"i": i, "tag": tag, "payload": "x" * 200_000})


def test_atomic_write_never_shows_a_partial_record(tmp_path):
    path = tmp_path / "runs" / "a" / "record.json"
    atomic_write_json(path, {"i": -1})
    writer = mp.get_context("spawn").Process(target=_writer, args=(str(path), 200))
    writer.start()
    reads = 0
    while writer.is_alive() or reads == 0:
        json.loads(path.read_text())  # raises on a half-written file
        reads += 1
    writer.join()
    assert writer.exitcode == 0
    assert json.loads(path.read_text())["i"] == 199
    assert not list(path.parent.glob("*.tmp")), "temporary files left behind"
    assert reads > 1


def test_many_concurrent_writers_never_corrupt_a_record(tmp_path):
    """Nodes of a cluster writing one shared results directory: every read parses, the last write wins whole."""
    path = tmp_path / "runs" / "a" / "record.json"
    atomic_write_json(path, {"i": -1, "tag": -1})
    ctx = mp.get_context("spawn")
    go, ready = ctx.Event(), ctx.Semaphore(0)
    writers = [ctx.Process(target=_writer, args=(str(path), 60, tag, go, ready)) for tag in range(4)]
    for w in writers:
        w.start()
    for _ in writers:
        assert ready.acquire(timeout=120)
    go.set()
    reads, tags = 0, set()
    while any(w.is_alive() for w in writers) or reads == 0:
        tags.add(json.loads(path.read_text())["tag"])  # raises on a half-written or interleaved file
        reads += 1
    for w in writers:
        w.join()
        assert w.exitcode == 0
    final = json.loads(path.read_text())
    assert final["i"] == 59 and final["tag"] in range(4) and len(final["payload"]) == 200_000
    assert not list(path.parent.glob("*.tmp")), "temporary files left behind"
    assert reads > 1 and len(tags - {-1}) >= 2, "the writers did not overlap"


def _cfg(tmp_path, *extra):
    return compose_cfg(["model=tiny_bert", "+experiment=smoke", f"results_dir={tmp_path}", *extra])


def test_completed_cell_is_skipped_unless_forced(tmp_path):
    first = run(_cfg(tmp_path))
    assert first["status"] == "completed"
    again = run(_cfg(tmp_path))
    assert again.get("skipped") and again["timestamps"] == first["timestamps"]
    forced = run(_cfg(tmp_path, "force=true"))
    assert not forced.get("skipped") and forced["attempts"] == 2
    assert len(list((tmp_path / "runs").iterdir())) == 1, "a rerun of the same cell must reuse its record"


def test_a_different_hyperparameter_is_a_different_cell(tmp_path):
    a = run(_cfg(tmp_path))
    b = run(_cfg(tmp_path, "method.r=4"))
    assert a["id"] != b["id"] and a["cell_key"] != b["cell_key"]


def test_failure_leaves_a_record_with_the_error(tmp_path):
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        run(_cfg(tmp_path, "method.r=0"))
    (record_path,) = (tmp_path / "runs").glob("*/record.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "failed"
    assert record["error"]["type"] == "ConfigError" and "rank r must be >= 1" in record["error"]["message"]
    assert "method=lora" in record["error"]["message"], "the error names the option to fix"
    assert record["timestamps"]["finished"]


class NanAfterTwoSteps(LoRA):
    """LoRA whose regulariser turns NaN at step 2: a stand-in for a diverging run."""

    def on_step_begin(self, model, step):
        self.step = step

    def extra_loss(self, model, batch, outputs):
        return torch.tensor(float("nan")) if self.step >= 2 else None


def test_nan_loss_ends_the_run_as_diverged(tmp_path):
    record = run(_cfg(tmp_path, f"method._target_={__name__}.NanAfterTwoSteps"))
    assert record["status"] == "diverged"
    assert record["error"]["step"] == 2
    saved = RunStore(tmp_path).read(record["id"])
    assert saved["status"] == "diverged" and "Lower method.lr" in saved["error"]["message"]

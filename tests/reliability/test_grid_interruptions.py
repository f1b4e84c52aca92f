"""Grids that are killed, or that share a results dir, end with one readable completed record per cell."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from bench.store import RECORD
from tests.helpers import REPO
from tests.reliability.cli import command, env


def popen(results: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(command(results, "hydra/launcher=local", *args), cwd=REPO, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def cells(results: Path) -> dict[str, dict]:
    """Each run dir's record: exactly one record.json each, readable, no half-written file beside it."""
    out = {}
    for run_dir in sorted((results / "runs").iterdir()):
        assert [p.name for p in run_dir.glob(f"{RECORD}*")] == [RECORD], list(run_dir.iterdir())
        assert not list(run_dir.glob(".*.tmp")) and not list(run_dir.glob("*.tmp")), list(run_dir.iterdir())
        out[run_dir.name] = json.loads((run_dir / RECORD).read_text())
    return out


def test_kill_9_mid_cell_then_rerun_completes_every_cell_once(tmp_path):
    grid = ("seed=0,1", "train.max_steps=150", "train.checkpoint_every=15", "-m")
    proc = popen(tmp_path, *grid)
    deadline = time.time() + 240
    while not list(tmp_path.glob("runs/*/checkpoint.pt")):  # the first cell is mid-training
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its cell, without a chance to write anything
    proc.wait(timeout=60)
    (killed,) = [json.loads(p.read_text()) for p in tmp_path.glob(f"runs/*/{RECORD}")]
    assert killed["status"] == "running"

    out = finish(popen(tmp_path, *grid))
    assert "grid summary: 2 cells: 2 completed" in out, out[-4000:]
    recs = cells(tmp_path)
    assert sorted(r["seed"] for r in recs.values()) == [0, 1] and len(recs) == 2
    assert all(r["status"] == "completed" for r in recs.values())
    resumed = recs[killed["id"]]
    assert resumed["attempts"] == 2 and resumed["resumed_from"] and resumed["resumed_from"][0] >= 15
    assert len(resumed["curve"]) == len(next(r for r in recs.values() if r["id"] != killed["id"])["curve"])
    assert not list(tmp_path.glob("runs/*/checkpoint.pt*"))


def test_two_grids_on_one_results_dir_lose_no_record(tmp_path):
    # seed 1 is in both grids and both start with it: the same cell runs twice at once (checkpoints every 2 steps)
    a = popen(tmp_path, "seed=1,0", "train.checkpoint_every=2", "-m")
    b = popen(tmp_path, "seed=1,2", "train.checkpoint_every=2", "-m")
    finish(a), finish(b)
    recs = cells(tmp_path)
    assert sorted(r["seed"] for r in recs.values()) == [0, 1, 2], sorted(recs)
    assert all(r["status"] == "completed" and r["metrics"] for r in recs.values())
    assert not list(tmp_path.glob("runs/*/checkpoint.pt*"))

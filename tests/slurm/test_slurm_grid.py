"""Grids on a real one-node SLURM cluster (tests/slurm/conftest.py), through `hydra/launcher=slurm` only:
every cell completes; a preempted or requeued job resumes from its checkpoint and ends exactly where an
uninterrupted run ends; a failing cell or a killed job does not stop the grid, and a rerun redoes only what did not
complete."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.slurm.conftest import Cluster

pytestmark = pytest.mark.slurm

# a cell long enough for a checkpoint to land before the interruption (a few seconds of training on a CPU)
LONG = ("train.max_steps=300", "train.checkpoint_every=20")


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*/record.json"))]


def job_logs(results: Path) -> str:
    """Everything the grid's SLURM jobs wrote (submitit keeps one log pair per job under the sweep folder)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(results.glob("hydra/*/.submitit/*/*_log.*")))


def test_grid_of_four_cells_completes_on_slurm(slurm_cluster: Cluster, tmp_path: Path) -> None:
    out = slurm_cluster.bench(tmp_path, "method=lora,full", "seed=0,1", "-m")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    recs = records(tmp_path)
    assert sorted((r["method"], r["seed"]) for r in recs) == [("full", 0), ("full", 1), ("lora", 0), ("lora", 1)]
    assert all(r["status"] == "completed" and r["metrics"] for r in recs), [r["status"] for r in recs]
    assert all(r["env"]["slurm_job_id"] for r in recs)  # each cell ran as a SLURM job ...
    assert len({r["env"]["slurm_array_task_id"] for r in recs}) == 4  # ... one task of the grid's job array
    assert "grid summary: 4 cells: 4 completed" in out.stdout


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: the same cell run once, without interruption, on this machine (no SLURM)."""
    results = tmp_path_factory.mktemp("uninterrupted")
    out = subprocess.run([sys.executable, "-m", "bench", "+experiment=smoke", "model=tiny_bert", *LONG,
                          f"results_dir={results}"], cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = records(results)
    assert record["status"] == "completed" and record["resumed_from"] == []
    return record


def _wait_for_checkpoint(results: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while not list(results.glob("runs/*/checkpoint.pt")):
        assert proc.poll() is None, f"the grid ended before the first checkpoint:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.1)


INTERRUPTIONS = {
    # what SLURM sends signal_delay_s before the time limit (and what submitit's own Job._interrupt sends):
    # the run checkpoints, submitit's handler requeues the job, the requeued job resumes
    "time_limit_signal": (["scancel", "--signal=USR1"], "SIGUSR1"),
    # preemption with PreemptMode=REQUEUE, or an operator's requeue: SIGTERM, then SLURM requeues the job itself
    "requeue": (["scontrol", "requeue"], "SIGTERM"),
}


@pytest.mark.parametrize("how", list(INTERRUPTIONS))
def test_interrupted_job_resumes_from_its_checkpoint_to_the_same_result(
        slurm_cluster: Cluster, uninterrupted: dict, tmp_path: Path, how: str) -> None:
    command, signal_name = INTERRUPTIONS[how]
    proc = slurm_cluster.bench(tmp_path, *LONG, "-m", popen=True)
    try:
        _wait_for_checkpoint(tmp_path, proc)
        (job,) = slurm_cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%i").split()
        slurm_cluster.run(*command, job)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "grid summary: 1 cells: 1 completed" in out
    (resumed,) = records(tmp_path)
    assert resumed["id"] == uninterrupted["id"] and resumed["status"] == "completed"
    (step,) = resumed["resumed_from"]  # interrupted once, resumed once ...
    assert 20 <= step < 300 and resumed["attempts"] == 2
    assert f"preempted: {signal_name} at step {step}" in job_logs(tmp_path)  # ... from the checkpoint the signal wrote
    states = slurm_cluster.run("sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", "State").split()
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    assert not list(tmp_path.glob("runs/*/checkpoint.pt"))
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert resumed["curve"] == uninterrupted["curve"]  # step, loss, lr, grad_norm: bit for bit


def test_a_killed_job_does_not_stop_the_grid_and_a_rerun_resumes_it(
        slurm_cluster: Cluster, uninterrupted: dict, tmp_path: Path) -> None:
    proc = slurm_cluster.bench(tmp_path, *LONG, "-m", popen=True)
    try:
        _wait_for_checkpoint(tmp_path, proc)
        (job,) = slurm_cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%i").split()
        slurm_cluster.run("scancel", job)  # SIGTERM and no requeue: the job ends without a result
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-3000:]  # the grid ended and reported the cell
    assert "grid summary: 1 cells: 1 failed" in out and "JobDied" in out and "CANCELLED" in out
    (killed,) = records(tmp_path)
    assert killed["status"] == "preempted" and list(tmp_path.glob("runs/*/checkpoint.pt"))

    rerun = slurm_cluster.bench(tmp_path, *LONG, "-m")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    (resumed,) = records(tmp_path)
    assert resumed["status"] == "completed" and resumed["resumed_from"] == [killed["error"]["step"]]
    assert resumed["metrics"] == uninterrupted["metrics"] and resumed["curve"] == uninterrupted["curve"]


def test_a_failing_cell_does_not_stop_the_grid_and_a_rerun_redoes_only_unfinished_cells(
        slurm_cluster: Cluster, tmp_path: Path) -> None:
    grid = ("method=lora", "method.r=0,4", "-m")  # r=0: the method rejects its configuration
    first = slurm_cluster.bench(tmp_path, *grid)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "grid summary: 2 cells: 1 completed, 1 failed" in first.stdout
    assert "rank r must be >= 1" in first.stdout  # the summary names the failing cell and why
    before = {r["config"]["method"]["r"]: r for r in records(tmp_path)}
    assert before[0]["status"] == "failed" and before[0]["error"]["type"] == "ConfigError"
    assert before[4]["status"] == "completed"

    second = slurm_cluster.bench(tmp_path, *grid)
    assert second.returncode == 1
    assert "grid summary: 2 cells: 1 failed, 1 skipped" in second.stdout
    after = {r["config"]["method"]["r"]: r for r in records(tmp_path)}
    assert after[4] == before[4]  # the completed cell was not run again
    assert after[0]["status"] == "failed" and after[0]["attempts"] == before[0]["attempts"] + 1

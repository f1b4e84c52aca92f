"""Multi-process cells (bench/distributed.py): DDP over 2 gloo processes on the CPU matches one process at the same
global batch, a method whose trainable set changes keeps its processes in step, and a killed cell resumes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
NO_DROPOUT = "++model.config_overrides={hidden_dropout_prob:0.0,attention_probs_dropout_prob:0.0}"


def command(results: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench", "+experiment=smoke", "model=tiny_bert", f"results_dir={results}",
            "record.save_delta=false", NO_DROPOUT, *args]


def bench(results: Path, *args: str) -> dict:
    out = subprocess.run(command(results, *args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (results / "runs").glob("*/record.json")]
    return record


@pytest.mark.parametrize("method", ["lora", "full", "lisa"])
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, method):
    extra = ["method.interval_steps=2"] if method == "lisa" else []  # LISA redraws its layers (new DDP wrapper)
    one = bench(tmp_path / "one", f"method={method}", *extra)
    two = bench(tmp_path / "two", f"method={method}", "train.strategy=ddp", "train.nproc=2", *extra)
    assert one["status"] == two["status"] == "completed"
    assert [c["step"] for c in one["curve"]] == [c["step"] for c in two["curve"]]
    for a, b in zip(one["curve"], two["curve"]):  # fp32 reduction order is the only difference
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)
    assert two["metrics"] == pytest.approx(one["metrics"], abs=1e-6)
    assert two["config"]["train"]["nproc"] == 2 and two["cell_key"] != one["cell_key"]
    assert len(list((tmp_path / "two" / "runs").iterdir())) == 1  # one record per cell, written by rank 0


def test_a_killed_multi_process_cell_resumes_to_the_same_final_metrics(tmp_path):
    args = ["train.strategy=ddp", "train.nproc=2", "train.max_steps=60", "train.checkpoint_every=2"]
    straight = bench(tmp_path / "straight", *args)
    results = tmp_path / "killed"
    child = subprocess.Popen(command(results, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not list(results.glob("runs/*/checkpoint.pt")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert child.poll() is None, "the run finished before its first checkpoint: raise train.max_steps"
    tree = [child.pid, *(p.pid for p in psutil.Process(child.pid).children(recursive=True))]
    for pid in tree:  # every process of the cell dies at once, mid-run (torchrun's workers have their own session)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    child.wait()
    (killed,) = [json.loads(p.read_text()) for p in results.glob("runs/*/record.json")]
    assert killed["status"] == "running" and list(results.glob("runs/*/checkpoint.pt"))
    resumed = bench(results, *args)
    assert resumed["status"] == "completed" and resumed["resumed_from"] and resumed["attempts"] == 2
    assert resumed["metrics"] == pytest.approx(straight["metrics"], abs=1e-6)
    assert resumed["curve"][-1]["loss"] == pytest.approx(straight["curve"][-1]["loss"], rel=1e-5)


def test_a_bad_strategy_names_the_fix(tmp_path):
    for args, fix in ((["train.nproc=2"], "train.strategy=ddp"),
                      (["train.strategy=ddp", "train.nproc=3"], "divisible by train.nproc"),
                      (["train.strategy=ring"], "train.strategy must be one of")):
        out = subprocess.run(command(tmp_path, *args), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and fix in out.stderr, out.stderr[-2000:]

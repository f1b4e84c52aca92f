"""Checkpoint and resume: a run interrupted mid-training ends exactly where an uninterrupted one does."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.train import train
from methods.lora import LoRA
from tests.helpers import REPO, logits, tiny, wrapped


class Killed(RuntimeError):
    pass


class DiesAtStep(LoRA):
    """LoRA whose job is killed after a given step (an exception stands in for the kill)."""

    def __init__(self, die_after: int, **kw):
        super().__init__(**kw)
        self.die_after = die_after

    def on_step_end(self, model, step, optimizer):
        if step + 1 == self.die_after:
            raise Killed(f"killed after step {step + 1}")
        return False


def _cfg(steps: int, every: int) -> SimpleNamespace:
    return SimpleNamespace(max_steps=steps, grad_accum=2, warmup_ratio=0.2, weight_decay=0.01, max_grad_norm=1.0,
                           log_every=1, eval_every=0, checkpoint_every=every)


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    # every run gets a fresh tiny() (a fresh seeded loader), as every job builds its own
    extra = ["method.dropout=0.1"]  # dropout: the RNG state must be restored too
    t = tiny("lora", extra=extra)
    torch.manual_seed(0)
    method, model = wrapped(t)
    whole = train(model, method, t.loader, _cfg(8, 3), torch.device("cpu"), None, lambda m: {}, progress=False)

    ckpt = tmp_path / "checkpoint.pt"
    t1 = tiny("lora", extra=extra)
    torch.manual_seed(0)
    dying = DiesAtStep(die_after=5, **{k: v for k, v in t1.cfg.method.items() if k not in ("_target_", "search")})
    m1 = dying.prepare(copy.deepcopy(t1.base), t1.ctx)
    with pytest.raises(Killed):
        train(m1, dying, t1.loader, _cfg(8, 3), torch.device("cpu"), None, lambda m: {}, progress=False, checkpoint=ckpt)
    assert ckpt.exists()  # written after step 3; the kill came after step 5

    t2 = tiny("lora", extra=extra)
    torch.manual_seed(123)  # a restarted job does not share the first one's RNG: the checkpoint must restore it
    method2, model2 = wrapped(t2)
    resumed = train(model2, method2, t2.loader, _cfg(8, 3), torch.device("cpu"), None, lambda m: {}, progress=False,
                    checkpoint=ckpt)
    assert resumed.resumed_from == [3] and not ckpt.exists()
    assert [r["loss"] for r in resumed.curve] == [r["loss"] for r in whole.curve]
    assert len(resumed.step_times) == 8
    torch.testing.assert_close(logits(model2, t.batch), logits(model, t.batch), rtol=0, atol=0)


def _bench(results: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", "+experiment=smoke", "model=tiny_bert", "progress=false",
                             f"results_dir={results}", "train.max_steps=200", "train.checkpoint_every=20", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _record(results: Path) -> dict:
    (path,) = results.glob("runs/*/record.json")
    return json.loads(path.read_text())


def test_sigterm_checkpoints_then_a_rerun_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    env_ok = hasattr(signal, "SIGTERM")
    if not env_ok:
        pytest.skip("no SIGTERM on this platform")
    results = tmp_path / "a"
    proc = _bench(results)
    deadline = time.time() + 300
    while not list(results.glob("runs/*/checkpoint.pt")):
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stdout.read()}"
        assert time.time() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out
    first = _record(results)
    assert first["status"] == "preempted", out
    stopped_at = first["error"]["step"]
    assert 20 <= stopped_at < 200

    rerun = _bench(results)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    resumed = _record(results)
    assert resumed["status"] == "completed" and resumed["resumed_from"] == [stopped_at]
    assert not list(results.glob("runs/*/checkpoint.pt"))

    whole = _bench(tmp_path / "b")
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out
    reference = _record(tmp_path / "b")
    assert resumed["metrics"] == reference["metrics"]
    assert [r["loss"] for r in resumed["curve"]] == [r["loss"] for r in reference["curve"]]

"""An exploding loss ends a run as diverged (bench.train.LossGuard); normal loss curves never trip the rule."""

from __future__ import annotations

import json
import math
import random

import pytest

from bench.train import Diverged, LossGuard
from tests.helpers import REPO


def feed(guard: LossGuard, losses: list[float], start: int = 0) -> None:
    for step, loss in enumerate(losses, start=start):
        guard.update(step, loss)


def noisy(rng: random.Random, n: int, start: float, end: float, noise: float) -> list[float]:
    return [max(0.0, start + (end - start) * i / n + rng.gauss(0, noise)) for i in range(n)]


@pytest.mark.parametrize("max_steps", [6, 100, 400, 1000])
def test_normal_curves_never_trip_it(max_steps):
    rng = random.Random(max_steps)
    warmup = math.ceil(0.06 * max_steps)
    curves = [
        noisy(rng, max_steps, 0.69, 0.25, 0.15),  # a classifier learning
        noisy(rng, max_steps, 0.69, 0.69, 0.30),  # one that never learns (collapsed to the prior): ~ln 2
        [0.69, 0.3, 1.6, 0.2, 1.9, *noisy(rng, max_steps - 5, 0.69, 0.8, 0.3)],  # high lr: spikes of 2-3x
        noisy(rng, max_steps, 8.7, 1.0, 0.2),  # SoRA: the loss adds eta * mean|g|, large at first, then shrinking
        noisy(rng, max_steps, 0.12, 0.10, 0.08),  # diffusion MSE at batch 1: noisy, near zero
        [-0.02 + rng.gauss(0, 0.02) for _ in range(max_steps)],  # a regulariser that makes the loss negative
        noisy(rng, max_steps, 1.8, 1.1, 0.3),  # a causal LM
    ]
    for curve in curves:
        feed(LossGuard(max_steps, warmup), curve[:max_steps])


def test_an_explosion_after_warmup_is_caught_at_its_step():
    guard = LossGuard(100, 6)
    with pytest.raises(Diverged, match="loss exploded") as info:
        feed(guard, [0.69] * 30 + [2500.0] * 20)
    assert 30 < info.value.step <= 40  # the mean of the last 10 steps passes 10 x 0.69 within a few steps
    with pytest.raises(Diverged) as info:
        feed(LossGuard(6, 1), [0.69, 2471.9, 64346.0])  # the smoke run at lr=1e3
    assert info.value.step == 2


def test_a_resumed_run_keeps_its_reference():
    first = LossGuard(100, 6)
    feed(first, [0.7] * 20)
    resumed = LossGuard(100, 6, early=first.early)  # TrainResult.early_losses, saved in the checkpoint
    with pytest.raises(Diverged):
        feed(resumed, [50.0] * 10, start=20)


def test_the_committed_runs_never_trip_it():
    """The committed 100-step GLUE runs (lr from /10 to x sqrt(10) of each default), replayed on their logged loss."""
    curves = []
    for path in sorted((REPO / "results").glob("**/runs/*/record.json")):
        record = json.loads(path.read_text())
        if record.get("status") in ("completed", "pruned") and len(record.get("curve") or []) > 3:
            curves.append([row["loss"] for row in record["curve"]])
    if not curves:
        pytest.skip("no committed records in results/")
    for losses in curves:
        feed(LossGuard(len(losses), 1), losses)

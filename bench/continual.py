"""A continual cell, top to bottom: stages (and single-task cells) → rebuild the model after each stage → score
every task seen so far → average, backward and forward transfer (tasks/continual.py).

    python -m bench task=continual/glue method=lora          # sequential LoRA over four GLUE tasks
    python -m bench task=continual/glue method=lora,full -m

Stage j is the cell `task=<task j> train.init_from=<stage j−1's run id>` (the continual cell's other overrides
kept), so stage 1 is the plain cell of task 1 and every stage is reused from the store once it is complete; the
single-task cells of tasks 2..T (for forward transfer) are plain cells too. The model after stage j is rebuilt as
θ_0 + τ_j from stage j's recorded ΔW and saved tensors, and must score on task j what stage j's record says.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig

from bench.merge import MATCH_TOLERANCE, Member, Scorer, load_member, member_cell, member_overrides, train_members
from bench.store import RunStore
from tasks.continual import ContinualTask, transfer


def run_continual(cfg: DictConfig, task: ContinualTask, store: RunStore, device: torch.device,
                  autocast_dtype: torch.dtype | None, overrides: list[str]) -> dict[str, Any]:
    """Run a continual cell; returns the record's fields (metrics, stages, params, cost)."""
    # ---------------------------------------------------------------- stages and single-task cells: reuse or train
    stages: list[Member] = []
    for name in task.sequence:
        extra = [*task.member_overrides, *([f"train.init_from={stages[-1].run_id}"] if stages else [])]
        stages.append(member_cell(name, member_overrides(overrides, name, extra), "task.sequence"))
    alone = [stages[0]] + [member_cell(n, member_overrides(overrides, n, task.member_overrides), "task.sequence")
                           for n in task.sequence[1:]]
    train_members(stages + alone[1:], store)  # in order: stage j starts from stage j−1
    t0 = time.perf_counter()
    scorers = [Scorer(m, device, autocast_dtype) for m in stages]  # task i's eval split and its stage-i head
    for m, s in zip(stages, scorers):
        load_member(m, store, s.base_state(), s.head_modules)

    # ---------------------------------------------------------------- R[j][i]: after stage j, on task i ≤ j
    t = len(stages)
    matrix: list[list[float | None]] = [[None] * t for _ in range(t)]
    metrics: dict[str, float] = {}
    for j, after in enumerate(stages):
        for i in range(j + 1):
            main = stages[i].record["main_metric"]
            matrix[j][i] = scorers[i].score(after.vector)[main]
            metrics[f"after/{after.task}/{stages[i].task}"] = matrix[j][i]
        recorded = float(after.record["metrics"][after.record["main_metric"]])
        if abs(matrix[j][j] - recorded) > MATCH_TOLERANCE:
            raise RuntimeError(
                f"stage {after.run_id}: rebuilt from its ΔW and saved tensors it scores {matrix[j][j]:.4f}, its "
                f"record says {recorded:.4f}; method={after.names['method']} changes the model beyond what it "
                "records, so its stages cannot be scored here")
    single = [float(m.record["metrics"][m.record["main_metric"]]) for m in alone]
    for m, score in zip(alone, single):
        metrics[f"alone/{m.task}"] = score
    metrics.update(transfer(matrix, single))
    higher = {k: True for k in metrics}
    return {
        "metrics": metrics, "main_metric": "average", "higher_is_better": higher,
        "eval_split": "dev", "eval_note": ("each task's eval split, scored with the head trained at its stage; "
                                           "`average`, `bwt` and `fwt` over the tasks' main metrics"),
        "stages": [{"task": m.task, "run_id": m.run_id, "main_metric": m.record["main_metric"],
                    "init_from": (m.record.get("init_from") or {}).get("run_id")} for m in stages],
        "alone": {m.task: m.run_id for m in alone},
        "matrix": matrix,
        "params": {"trainable": 0, "stages_trainable": [int(m.record["params"].get("trainable", 0)) for m in stages]},
        "cost": {"eval_s": time.perf_counter() - t0, "device": str(device),
                 "precision": str(autocast_dtype or "fp32")},
    }

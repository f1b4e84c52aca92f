"""Continual learning: a sequence of tasks learnt one after another by one model, every task seen so far scored
after each stage.

A continual cell (`task=continual/<name>`, conf/task/continual/) names its stages (ordinary task options); stage 1
is the plain cell of the first task, and stage j the cell of task j with `train.init_from=<stage j−1's run>`, which
starts from everything stage j−1 trained except its task head (bench/run.py start_from). Each task keeps its own
head, trained at its stage (the task-incremental setting: the task id is known at test time). bench/continual.py
trains the stages (or reuses them), rebuilds the model after each stage from its recorded task vector, and fills
the accuracy matrix R[j][i] (the model after stage j on task i, i ≤ j, with task i's head).

Metrics (Lopez-Paz & Ranzato, arXiv 1706.08840, for the average and backward transfer; forward transfer against
single-task training, as Continual World, arXiv 2105.10919, defines it, since a head not yet trained has no score):
- average: mean_i R[T][i], the final model on every task (each task's main metric);
- bwt: mean_{i<T} (R[T][i] − R[i][i]), backward transfer (negative: forgetting);
- fwt: mean_{i>1} (R[i][i] − S_i), forward transfer, S_i the same method trained on task i alone from the
  pretrained model (that plain cell is trained too, or reused).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.merge import task_key_overrides


class ContinualTask:
    """A sequence of member tasks learnt in order (see the module docstring).

    Args:
        sequence: task options in training order (e.g. [glue/sst2, glue/mrpc, glue/rte]); at least two.
        member_overrides: overrides every stage cell gets on top of the continual cell's own.
        **member_keys: any other task key is a key of the stages' tasks (`task.<key>=<value>` for each).
    """

    name = "continual"
    suite = None

    def __init__(self, sequence: Sequence[str], member_overrides: Sequence[str] = (), **member_keys: Any) -> None:
        sequence = [str(t) for t in sequence]
        if len(sequence) < 2 or len(set(sequence)) != len(sequence):
            raise ValueError(f"task.sequence must name at least two different tasks, got {sequence}")
        if any(t.startswith(("continual/", "merge/")) for t in sequence):
            raise ValueError(f"task.sequence holds the tasks learnt in turn, not composite tasks: {sequence}")
        self.sequence = sequence
        self.member_overrides = [str(o) for o in member_overrides] + task_key_overrides(member_keys)


def transfer(matrix: Sequence[Sequence[float | None]], alone: Sequence[float]) -> dict[str, float]:
    """average, bwt and fwt of a lower-triangular score matrix R[j][i] (i ≤ j) and the single-task scores S_i."""
    t = len(matrix)
    final = matrix[t - 1]
    return {
        "average": sum(final[i] for i in range(t)) / t,
        "bwt": sum(final[i] - matrix[i][i] for i in range(t - 1)) / (t - 1),
        "fwt": sum(matrix[i][i] - alone[i] for i in range(1, t)) / (t - 1),
    }

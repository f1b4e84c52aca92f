"""The taught model an unlearning cell starts from (tasks/unlearn.py): its teacher cell, trained once, reused.

The teacher is an ordinary cell of `task=unlearn/facts_teach`: the unlearning cell's model, device and precision,
the task keys both tasks share, and the teacher's own method, seed and overrides (task.teacher), so every
unlearning method, objective and seed on one model starts from the same taught weights, and a plain run of that
cell reuses them. It is trained first (in its own process) when the store has no completed record of it.

Its trained weights θ_taught = θ_0 + τ (its recorded ΔW, plus saved − θ_0 for every other tensor it trained, as a
merge member's; bench/merge.py) replace the pretrained ones before the unlearning method wraps the model, so the
unlearning run's ΔW is the change from the taught model. The rebuilt taught model is scored on the unlearning
cell's eval rows first: those `taught/...` metrics are the "before" of every unlearning record, and its `known`
must match the teacher record's (MATCH_TOLERANCE), or the weights loaded are not the ones the teacher ended with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from bench.merge import MATCH_TOLERANCE, Member, load_member, member_cell, train_members
from bench.store import RunStore
from tasks.merge import task_key_overrides
from tasks.unlearn import UnlearnTask

log = logging.getLogger("bench")

TEACH_TASK = "unlearn/facts_teach"
#: the unlearning cell's overrides a teacher shares (the key or any key under it); all else is the teacher's own
SHARED = ("model", "device", "precision", "results_dir", "progress")
#: task keys of the unlearning cell that the teacher's task has too
SHARED_TASK_KEYS = ("source", "forget_fraction", "max_eval_samples", "prompt_format", "max_length",
                    "max_new_tokens", "eval_chunk", "train_on_inputs", "eval_subset_seed", "probe_samples",
                    "probe_source", "probe_max_length")


def teacher_overrides(overrides: list[str], cfg: DictConfig, task: UnlearnTask) -> list[str]:
    """The teacher cell's overrides (module docstring)."""
    def shared(o: str) -> bool:
        key = o.split("=", 1)[0].lstrip("+~")
        return any(key == k or key.startswith(k + ".") for k in SHARED)

    teacher = task.teacher
    keys = {k: cfg.task[k] for k in SHARED_TASK_KEYS if k in cfg.task}
    return [o for o in overrides if shared(o)] + [
        f"task={TEACH_TASK}", *task_key_overrides(keys), f"method={teacher.get('method', 'full')}",
        f"seed={int(teacher.get('seed', 0))}", *[str(o) for o in teacher.get("overrides", [])]]


def teacher_cell(cfg: DictConfig, task: UnlearnTask, overrides: list[str]) -> Member:
    return member_cell(TEACH_TASK, teacher_overrides(overrides, cfg, task), "task.teacher")


@torch.no_grad()
def load_taught(model: torch.nn.Module, teacher: Member, store: RunStore, head_modules: list[str]) -> None:
    """Set `model`'s weights (pretrained θ_0) to the teacher's θ_0 + τ. Values are assigned, never added, so a tied
    pair (embeddings and LM head) that appears under two names is set once to the same tensor."""
    state = model.state_dict()
    base = {n: t.detach().to("cpu").clone() for n, t in state.items()}
    load_member(teacher, store, base, head_modules)
    targets = {n: base[n] + d for n, d in teacher.vector.items()} | dict(teacher.head)
    for name, value in targets.items():
        state[name].copy_(value.to(state[name].device, state[name].dtype))


def start_taught(cfg: DictConfig, task: UnlearnTask, store: RunStore, model: torch.nn.Module,
                 head_modules: list[str], evaluate: Callable[[torch.nn.Module], dict[str, float]],
                 overrides: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Train or reuse the teacher, load its weights into `model`, score them. Returns (the record's `taught`
    block, the taught model's metrics)."""
    teacher = teacher_cell(cfg, task, overrides)
    train_members([teacher], store)
    load_taught(model, teacher, store, head_modules)
    metrics = evaluate(model)
    recorded = float(teacher.record["metrics"][teacher.record["main_metric"]])
    if abs(metrics["known"] - recorded) > MATCH_TOLERANCE:
        raise RuntimeError(f"teacher {teacher.run_id}: rebuilt from its ΔW and saved tensors it knows "
                           f"{metrics['known']:.4f} of the facts, its record says {recorded:.4f}; method="
                           f"{teacher.names['method']} changes the model beyond what it records, so it cannot teach "
                           "(task.teacher.method=full or lora)")
    log.info("unlearning from the taught model %s: %s", teacher.run_id, metrics)
    return {"run_id": teacher.run_id, "method": teacher.names["method"], "known": recorded}, metrics

"""A merge cell, top to bottom: members → task vectors → rebuild each member → merge → score on every member.

    python -m bench task=merge/glue method=lora                           # TIES over three GLUE adapters
    python -m bench task=merge/glue method=lora,full task.merger=average,ties,lora_lego -m

Each member is an ordinary cell: the merge cell's own overrides with `task=<member>` (and task.member_overrides),
so its run id and cell key are those a plain `python -m bench task=<member> ...` gives. A completed member is reused
from the store; a missing one is trained first, in its own process, and leaves its own record (a member record that
lacks its ΔW or adapter files, e.g. one committed from another machine, is rerun with force=true to write them).

A member is rebuilt as θ_0 + τ_t with its own head and scored before anything is merged: that score must match its
record's (tolerance MATCH_TOLERANCE), or the method's trained model is not what its ΔW and saved tensors say and the
merge refuses it. The merged model θ_0 + τ_merged is then scored on every member's eval split with that member's
head; `normalized` divides each score by the rebuilt member's (how much of the individual adapter survives).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from bench.models import load_model
from bench.store import RunStore
from bench.validate import ConfigError
from tasks.merge import Factors, MergeTask, TaskVector

log = logging.getLogger("bench")

#: The most a rebuilt member's main metric may differ from its record's: an fp32 sum W0 + ΔW rounds differently
#: from the trained module's forward, which can flip a prediction or two on a borderline example, never more.
MATCH_TOLERANCE = 0.01
#: PEFT's naming of a wrapped model: prefix and the trained copy of a `modules_to_save` module
PEFT_PREFIX, SAVED_COPY, ORIGINAL = "base_model.model.", ".modules_to_save.default.", ".original_module."


@dataclass
class Member:
    """One member cell: its task option, composed config, option names and run id, and once loaded its record."""

    task: str
    overrides: list[str]
    cfg: DictConfig
    names: dict[str, str]
    run_id: str
    record: dict[str, Any] = field(default_factory=dict)
    vector: TaskVector = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    factors: Factors = field(default_factory=dict)


def member_overrides(merge_overrides: list[str], member: str, extra: list[str]) -> list[str]:
    """The merge cell's command-line overrides with the task replaced by `member` (every task key dropped)."""
    def is_task(o: str) -> bool:
        key = o.split("=", 1)[0].lstrip("+~")
        return key == "task" or key.startswith("task.")

    return [o for o in merge_overrides if not is_task(o)] + [f"task={member}", *extra]


def compose_member(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """A member's config and option names (Hydra's choices), composed as `python -m bench` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bench.run import CONF

    def _compose() -> DictConfig:
        return compose("config", overrides=overrides, return_hydra_config=True)

    if GlobalHydra.instance().is_initialized():  # inside `python -m bench`: the running app's config search path
        cfg = _compose()
    else:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = _compose()
    choices = cfg.hydra.runtime.choices
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return cfg, {g: str(choices[g]) for g in ("method", "task", "model")}


def member_cell(task: str, overrides: list[str], role: str = "task.members") -> Member:
    """The member cell of `task` composed from `overrides`: its config, option names and run id (`role` names the
    composite task's key in the error)."""
    from bench.run import apply_training_params, cell_key, cell_names, run_id_of

    try:
        mcfg, choices = compose_member(overrides)
    except Exception as e:  # noqa: BLE001  (hydra's errors: an unknown task option, a key the member lacks)
        raise ConfigError(f"{role}: member {task} cannot be composed ({e}); members are task options such as "
                          "glue/sst2") from e
    apply_training_params(mcfg, overrides)  # as run() does: a method=peft member's run id holds its training params
    names = cell_names(mcfg, choices)
    return Member(task, overrides, mcfg, names, run_id_of(names, mcfg.seed, cell_key(mcfg, names)))


def resolve_members(task: MergeTask, overrides: list[str]) -> list[Member]:
    return [member_cell(name, member_overrides(overrides, name, task.member_overrides)) for name in task.members]


def has_artifacts(run_dir: Path) -> bool:
    return (run_dir / "delta.safetensors").is_file() and (run_dir / "adapter.safetensors").is_file()


def train_members(members: list[Member], store: RunStore,
                  ready: Callable[[Member, Path], bool] = lambda m, run_dir: has_artifacts(run_dir)) -> None:
    """Reuse each completed member whose run folder is `ready` (default: it has its ΔW and adapter files); train
    (or rerun) the others, one process each."""
    for m in members:
        record = store.read(m.run_id)
        done = record is not None and record.get("status") == "completed"
        if done and ready(m, store.run_dir(m.run_id)):
            log.info("member %s: reusing %s", m.task, m.run_id)
        else:
            why = "its run folder lacks files this cell needs" if done else "no completed record"
            log.info("member %s: training %s (%s)", m.task, m.run_id, why)
            cmd = [sys.executable, "-m", "bench", *m.overrides, "record.save_delta=true", "record.save_adapter=true",
                   *(["force=true"] if done else [])]
            code = subprocess.run(cmd, check=False).returncode
            record = store.read(m.run_id)
            if code != 0 or record is None or record.get("status") != "completed":
                status = (record or {}).get("status", "no record")
                message = ((record or {}).get("error") or {}).get("message", "")
                raise RuntimeError(f"member {m.task} ({m.run_id}) did not complete: {status} {message} "
                                   f"(exit status {code}); run it alone to see why: python -m bench "
                                   f"{' '.join(m.overrides)}")
            if not ready(m, store.run_dir(m.run_id)):
                raise RuntimeError(f"member {m.run_id} completed without the files this cell needs (delta.safetensors, "
                                   "adapter.safetensors, snapshots/); its method wrote no ΔW (method.mergeable is "
                                   "false?)")
        m.record = record


def plain_name(key: str) -> str | None:
    """A saved tensor's name in the plain model (PEFT's prefix and trained head copies undone); None for a
    PEFT original module (the frozen twin of a trained head)."""
    if ORIGINAL in key:
        return None
    key = key.removeprefix(PEFT_PREFIX)
    return key.replace(SAVED_COPY, ".")


def lora_factors(adapter: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> Factors:
    """{layer: (s·B, A)} for each layer whose saved LoRA factors give its recorded ΔW = s·B·A; s is fitted by least
    squares (it covers α/r, rsLoRA's α/√r, any scaling), and a layer whose ΔW is not s·B·A (DoRA, VeRA, ...) is
    left out (LoRA-LEGO then factors its ΔW by SVD)."""
    out: Factors = {}
    for layer, delta in deltas.items():
        a = adapter.get(f"{PEFT_PREFIX}{layer}.lora_A.default.weight")
        b = adapter.get(f"{PEFT_PREFIX}{layer}.lora_B.default.weight")
        if a is None or b is None or a.ndim != 2 or delta.ndim != 2:
            continue
        product = b.double() @ a.double()  # (m, n)
        norm = float((product * product).sum())
        if norm == 0.0:
            continue
        s = float((product * delta.double()).sum()) / norm
        if float((s * product - delta.double()).norm()) <= 1e-4 * max(float(delta.double().norm()), 1e-12):
            out[layer] = ((s * b.double()).float(), a.float())
    return out


def load_member(m: Member, store: RunStore, base: dict[str, torch.Tensor], head_modules: list[str]) -> None:
    """τ_t over the backbone (the recorded ΔW of adapted layers, saved − θ_0 for any other backbone tensor the
    method trained), the trained head, and the LoRA factors where the adapter has them."""
    run_dir = store.run_dir(m.run_id)
    deltas = load_file(str(run_dir / "delta.safetensors"))
    adapter = load_file(str(run_dir / "adapter.safetensors"))
    in_head = lambda n: any(n == h or n.startswith(h + ".") for h in head_modules)  # noqa: E731
    vector: TaskVector = {}
    for layer, delta in deltas.items():
        weight = f"{layer}.weight"
        if weight not in base:
            raise RuntimeError(f"merge member {m.run_id}: ΔW of {layer!r} has no weight in the base model")
        vector[weight] = delta.reshape(base[weight].shape).float()
    for key, value in adapter.items():
        name = plain_name(key)
        if name is None or name not in base:
            continue  # an adapter tensor (its effect is in ΔW) or a frozen copy
        if in_head(name):
            m.head[name] = value.float()
        elif name not in vector:  # a backbone tensor trained in full (full fine-tuning's biases and norms)
            diff = value.float() - base[name].float()
            if diff.abs().max() > 0:
                vector[name] = diff
    m.vector, m.factors = vector, lora_factors(adapter, deltas)


class Scorer:
    """Scores θ_0 + τ with a member's head on its eval split; the base model and eval batches are loaded once."""

    def __init__(self, m: Member, device: torch.device, autocast_dtype: torch.dtype | None) -> None:
        from bench.run import build, seed_everything

        self.member, self.device, self.dtype = m, device, autocast_dtype
        self.task = build(m.cfg.task, "task", m.names["task"])
        seed_everything(int(m.cfg.seed))  # the head it started from (overwritten by the trained head)
        loaded = load_model(m.cfg.model, self.task.head)
        self.model, self.head_modules, self.tokenizer = loaded.model.to(device), loaded.head_modules, loaded.tokenizer
        self.base = {n: p.detach().clone() for n, p in self.model.state_dict().items()}
        rows = sorted(self.task.examples("eval"), key=self.task.length)
        self.loader = DataLoader(rows, batch_size=int(m.cfg.train.eval_batch_size),
                                 collate_fn=self.task.eval_collate_fn(loaded.tokenizer))

    def base_state(self) -> dict[str, torch.Tensor]:
        return {n: t.to("cpu") for n, t in self.base.items()}

    @torch.no_grad()
    def score(self, vector: TaskVector) -> dict[str, float]:
        state = {n: t.clone() for n, t in self.base.items()}
        for name, delta in vector.items():
            state[name] += delta.to(state[name].device, state[name].dtype)
        for name, value in self.member.head.items():
            state[name] = value.to(state[name].device, state[name].dtype)
        self.model.load_state_dict(state)
        return self.task.evaluate(self.model, self.loader, self.device, self.dtype)


def run_merge(cfg: DictConfig, task: MergeTask, store: RunStore, device: torch.device,
              autocast_dtype: torch.dtype | None, overrides: list[str]) -> dict[str, Any]:
    """Run a merge cell; returns the record's fields (metrics, members, merge, params, cost)."""
    from bench.run import build

    method = build(cfg.method, "method", "method")
    if not method.mergeable:
        raise ConfigError(f"method={cfg.method.get('_target_')} has no ΔW (its update depends on the input), so "
                          "its adapters cannot be merged; choose a mergeable method")
    # ---------------------------------------------------------------- members: reuse or train, then load
    members = resolve_members(task, overrides)
    train_members(members, store)
    t0 = time.perf_counter()
    scorers = [Scorer(m, device, autocast_dtype) for m in members]
    for m, s in zip(members, scorers):
        load_member(m, store, s.base_state(), s.head_modules)

    # ---------------------------------------------------------------- rebuild each member alone: the denominators
    metrics: dict[str, float] = {}
    higher: dict[str, bool] = {}
    summary: dict[str, Any] = {}
    individual: dict[str, float] = {}
    for m, s in zip(members, scorers):
        main = m.record["main_metric"]
        rebuilt = s.score(m.vector)[main]
        recorded = float(m.record["metrics"][main])
        if abs(rebuilt - recorded) > MATCH_TOLERANCE:
            raise RuntimeError(
                f"merge member {m.run_id}: rebuilt from its ΔW and saved tensors it scores {main}={rebuilt:.4f}, "
                f"its record says {recorded:.4f}; method={m.names['method']} changes the model beyond what it "
                "records, so its adapters cannot be merged here")
        individual[m.task] = rebuilt
        summary[m.task] = {"run_id": m.run_id, "cell_key": m.record.get("cell_key"), "main_metric": main,
                           "recorded": recorded, "rebuilt": rebuilt, "tensors": len(m.vector),
                           "lora_factors": len(m.factors)}

    # ---------------------------------------------------------------- merge, then score on every member
    t_merge = time.perf_counter()
    merged, info = task.merge([m.vector for m in members], [m.factors for m in members], seed=int(cfg.seed))
    merge_s = time.perf_counter() - t_merge
    for m, s in zip(members, scorers):
        main = m.record["main_metric"]
        scores = s.score(merged)
        for metric, value in scores.items():
            metrics[f"{m.task}/{metric}"] = value
            higher[f"{m.task}/{metric}"] = bool(m.record.get("higher_is_better", {}).get(metric, True))
        metrics[f"{m.task}/individual"] = individual[m.task]
        # a member that learnt nothing (a score ≤ 0: an F1 of 0, a negative correlation) has no meaningful ratio
        metrics[f"{m.task}/normalized"] = scores[main] / individual[m.task] if individual[m.task] > 0 else float("nan")
        higher[f"{m.task}/individual"] = higher[f"{m.task}/normalized"] = True
    t = len(members)
    ratios = [metrics[f"{m.task}/normalized"] for m in members if metrics[f"{m.task}/normalized"] == metrics[f"{m.task}/normalized"]]
    # over the members with a ratio (a member that learnt nothing has none); how many is recorded beside it
    metrics["normalized_avg"] = sum(ratios) / len(ratios) if ratios else float("nan")
    metrics["normalized_members"] = float(len(ratios))
    metrics["merged_avg"] = sum(metrics[f"{m.task}/{m.record['main_metric']}"] for m in members) / t
    metrics["individual_avg"] = sum(individual.values()) / t
    higher.update(normalized_avg=True, merged_avg=True, individual_avg=True)
    merged_params = sum(v.numel() for v in merged.values())
    splits = {str(m.record.get("eval_split")) for m in members}
    return {
        "metrics": metrics, "main_metric": "normalized_avg", "higher_is_better": higher,
        "eval_split": splits.pop() if len(splits) == 1 else "mixed",
        "eval_note": "each member task's eval split, scored with that member's own head",
        "members": summary, "merge": {**task.settings(), **info},
        "params": {"trainable": 0, "merged_entries": merged_params,
                   "members_trainable": sum(int(m.record["params"].get("trainable", 0)) for m in members)},
        "cost": {"merge_s": merge_s, "eval_s": time.perf_counter() - t0 - merge_s, "device": str(device),
                 "precision": str(autocast_dtype or "fp32")},
    }

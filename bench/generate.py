"""A generation cell, top to bottom: members (with snapshots) → condition vectors → CVAE → generate → score.

    python -m bench task=generate/glue method=lora

Every member and held-out task is an ordinary cell (bench/merge.py's member_cell: the generation cell's overrides
with `task=<task>`); a member also writes `record.snapshots` adapter snapshots, and one whose completed record
lacks them is rerun. Each task's real adapter is rebuilt from its ΔW and scored first: that score must match its
record's (MATCH_TOLERANCE) and is the denominator of the generated adapters' normalised scores. The generated
adapter's LoRA factors become ΔW = s·B·A with each layer's s fitted on a member's saved factors (lora_factors).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from bench.merge import (MATCH_TOLERANCE, PEFT_PREFIX, Member, Scorer, has_artifacts, load_member, member_cell,
                         member_overrides, plain_name, train_members)
from bench.store import RunStore
from bench.validate import ConfigError
from tasks.generate import CVAE, Flattener, GenerateTask, generate, train_cvae
from tasks.merge import TaskVector

log = logging.getLogger("bench")


def snapshot_files(m: Member, run_dir: Path, count: int) -> list[Path]:
    from bench.run import snapshot_steps

    return [run_dir / "snapshots" / f"step_{s:06d}.safetensors" for s in snapshot_steps(count,
                                                                                        int(m.cfg.train.max_steps))]


@torch.no_grad()
def condition(scorer: Scorer, rows: list[Any], device: torch.device) -> torch.Tensor:
    """The task vector (module docstring of tasks/generate.py): [mean hidden state ; label-1 mean − label-0 mean]
    of the pretrained backbone over `rows`, mean-pooled over each row's tokens. (2·hidden,)"""
    task, model = scorer.task, scorer.model
    batch = {k: v.to(device) for k, v in task.collate_fn(scorer.tokenizer)(rows).items()}
    labels = batch.pop("labels")  # (N,)
    model.eval()
    hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()  # (N, T, H)
    mask = batch["attention_mask"][..., None].float()  # (N, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # (N, H)
    pos, neg = pooled[labels == 1], pooled[labels == 0]
    if not len(pos) or not len(neg):
        raise ConfigError(f"task={task.name}: its {len(rows)} context examples hold one label only; raise "
                          "task.context_examples")
    return torch.cat([pooled.mean(0), pos.mean(0) - neg.mean(0)]).cpu()


def layer_scales(adapter: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                 ) -> dict[str, float]:
    """{layer: s} with s·B = the fitted factor (lora_factors) and B the adapter's own lora_B."""
    out = {}
    for layer, (sb, _) in factors.items():
        b = adapter[f"{PEFT_PREFIX}{layer}.lora_B.default.weight"].double()
        out[layer] = float((sb.double() * b).sum() / (b * b).sum().clamp_min(1e-30))
    return out


def as_update(adapter: dict[str, torch.Tensor], scales: dict[str, float], head_modules: list[str],
              base: dict[str, torch.Tensor]) -> tuple[TaskVector, dict[str, torch.Tensor]]:
    """(ΔW per weight from a generated adapter's factors, its head tensors by plain name)."""
    vector: TaskVector = {}
    for layer, s in scales.items():
        a = adapter[f"{PEFT_PREFIX}{layer}.lora_A.default.weight"].double()  # (r, n)
        b = adapter[f"{PEFT_PREFIX}{layer}.lora_B.default.weight"].double()  # (m, r)
        vector[f"{layer}.weight"] = (s * b @ a).float().reshape(base[f"{layer}.weight"].shape)
    in_head = lambda n: any(n == h or n.startswith(h + ".") for h in head_modules)  # noqa: E731
    head = {plain_name(k): v for k, v in adapter.items() if plain_name(k) and in_head(plain_name(k))}
    return vector, head


def run_generate(cfg: DictConfig, task: GenerateTask, store: RunStore, device: torch.device,
                 autocast_dtype: torch.dtype | None, overrides: list[str]) -> dict[str, Any]:
    """Run a generation cell; returns the record's fields (metrics, members, generate, curve, params, cost)."""
    # ---------------------------------------------------------------- members with snapshots, held-out tasks
    seen_extra = [*task.member_overrides, f"record.snapshots={task.snapshots}"]
    seen = [member_cell(n, member_overrides(overrides, n, seen_extra)) for n in task.members]
    held = [member_cell(n, member_overrides(overrides, n, task.member_overrides)) for n in task.held_out]
    train_members(seen, store, ready=lambda m, d: has_artifacts(d) and all(
        f.is_file() for f in snapshot_files(m, d, task.snapshots)))
    train_members(held, store)
    t0 = time.perf_counter()
    everyone = seen + held
    scorers = [Scorer(m, device, autocast_dtype) for m in everyone]
    for m, s in zip(everyone, scorers):
        head = s.task.head
        if head.kind != "seq_cls" or head.num_labels != 2 or head.problem_type != "single_label_classification":
            raise ConfigError(f"task={m.task}: adapter generation needs binary classification tasks (one head shape "
                              f"for every task); it has a {head.kind} head with {head.num_labels} labels")
        load_member(m, store, s.base_state(), s.head_modules)
        if not m.factors:
            raise ConfigError(f"method={m.names['method']} saves no LoRA factors (B, A) whose product is its ΔW; "
                              "adapter generation learns LoRA adapters (method=lora, or a variant with plain B·A)")

    # ---------------------------------------------------------------- each real adapter rebuilt: the denominators
    individual: dict[str, float] = {}
    for m, s in zip(everyone, scorers):
        main = m.record["main_metric"]
        individual[m.task] = s.score(m.vector)[main]
        recorded = float(m.record["metrics"][main])
        if abs(individual[m.task] - recorded) > MATCH_TOLERANCE:
            raise RuntimeError(f"member {m.run_id}: rebuilt from its ΔW and saved tensors it scores "
                               f"{individual[m.task]:.4f}, its record says {recorded:.4f}")

    # ---------------------------------------------------------------- training data: snapshots × task vectors
    rows_seed = int(cfg.seed)
    conditions = {m.task: condition(s, s.task.examples("train", seed=rows_seed)[:task.context_examples], device)
                  for m, s in zip(everyone, scorers)}
    snapshots = {m.task: [load_file(str(f)) for f in snapshot_files(m, store.run_dir(m.run_id), task.snapshots)]
                 for m in seen}
    flat = Flattener([a for group in snapshots.values() for a in group], multiple=2 ** len(task.channels))
    xs = torch.stack([flat.flatten(a) for m in seen for a in snapshots[m.task]])  # (S, L)
    cs = torch.stack([conditions[m.task] for m in seen for _ in snapshots[m.task]])  # (S, C)
    torch.manual_seed(int(cfg.seed))
    cvae = CVAE(flat.padded, cs.shape[1], task.latent_dim, task.hidden_dim, task.channels).to(device)
    xs, cs = xs.to(device), cs.to(device)
    log.info("CVAE: %d training adapters of %d entries (%d padded), %d parameters", len(xs), flat.length,
             flat.padded, sum(p.numel() for p in cvae.parameters()))
    curve = train_cvae(cvae, xs, cs, task.epochs, task.batch_size, task.lr, task.beta, int(cfg.seed))

    # ---------------------------------------------------------------- generate and score every task
    final = load_file(str(store.run_dir(seen[0].run_id) / "adapter.safetensors"))
    scales = layer_scales(final, seen[0].factors)
    metrics: dict[str, float] = {"reconstruction_mse": curve[-1]["mse"], "kl": curve[-1]["kl"]}
    for i, (m, s) in enumerate(zip(everyone, scorers)):
        main = m.record["main_metric"]
        scores = []
        for x in generate(cvae, conditions[m.task].to(device), task.samples, int(cfg.seed) * 1000 + i).cpu():
            vector, head = as_update(flat.unflatten(x), scales, s.head_modules, s.base)
            own = dict(m.head)
            m.head = {**own, **head}
            try:
                scores.append(s.score(vector)[main])
            finally:
                m.head = own
        metrics[f"{m.task}/generated"] = sum(scores) / len(scores)
        metrics[f"{m.task}/generated_best"] = max(scores)
        metrics[f"{m.task}/individual"] = individual[m.task]
        metrics[f"{m.task}/normalized"] = (metrics[f"{m.task}/generated"] / individual[m.task]
                                           if individual[m.task] > 0 else float("nan"))
    for name, group in (("seen", seen), ("heldout", held)):
        ratios = [r for r in (metrics[f"{m.task}/normalized"] for m in group) if not math.isnan(r)]
        if group:
            metrics[f"{name}_normalized"] = sum(ratios) / len(ratios) if ratios else float("nan")
    return {
        "metrics": metrics, "main_metric": task.main_metric,
        "higher_is_better": {k: k not in ("reconstruction_mse", "kl") for k in metrics},
        "eval_split": "dev", "eval_note": ("each task's eval split, scored with adapters the CVAE generated from "
                                           "its condition vector; normalized = generated / the real adapter's score"),
        "members": {m.task: {"run_id": m.run_id, "main_metric": m.record["main_metric"],
                             "held_out": m in held} for m in everyone},
        "generate": {"training_adapters": len(xs), "entries": flat.length, "padded": flat.padded,
                     "samples": task.samples, "epochs": task.epochs, "channels": list(task.channels)},
        "curve": [{"step": c["epoch"], "loss": c["loss"], "mse": c["mse"], "kl": c["kl"]} for c in curve],
        "params": {"trainable": sum(p.numel() for p in cvae.parameters())},
        "cost": {"train_s": time.perf_counter() - t0, "device": str(device),
                 "precision": str(autocast_dtype or "fp32")},
    }

"""`python -m bench.overhead`: what the suite's training loop costs over a bare PyTorch loop doing the same work.

    python -m bench.overhead --methods lora,full --steps 20 --rounds 9 [Hydra overrides, e.g. model=minilm]

For each method, two copies of the same model are built from the same seed: one trains through the suite's loop
(bench.train.train: the method's hooks, the loss guard, the curve, the progress bar, the memory probe), the other
through the loop a PyTorch user writes by hand: forward, backward, gradient clipping, torch.optim.AdamW with the same
parameter groups and schedule, zero_grad — with the model built by PEFT's own get_peft_model where the method is
PEFT's (its `peft_config`), else by the method's prepare(). Both read identical batches (two loaders seeded alike)
and draw identical dropout masks (the RNG is reseeded before each block), so they do the same arithmetic; the tool
checks that their losses agree, so the ratio compares like with like.

Rounds alternate a block of `steps` steps of each loop in a random order; a round's ratio is suite time / bare time,
and the report gives the median ratio over rounds with a percentile-bootstrap 95% CI of that median. What happens
once per run (loading, evaluation, the record) is not per-step cost and is not measured here.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from bench.run import compose_config
from bench.steptime import bootstrap_median_ci, prepare
from bench.train import batches, lr_factor, train
from methods.base import WrapContext

CONF = Path(__file__).resolve().parents[1] / "conf"
log = logging.getLogger("bench.overhead")


@dataclass
class Side:
    """One copy of the model with what its loop needs."""

    model: nn.Module
    loader: Any
    method: Any = None  # the suite's side only
    params: list[nn.Parameter] | None = None  # the bare side: what AdamW updates, in the method's groups
    groups: list[dict[str, Any]] | None = None


def compose_cfg(method_name: str, overrides: list[str], steps: int) -> DictConfig:
    cfg = compose_config([f"method={method_name}", *overrides])
    with open_dict(cfg):
        cfg.train.max_steps = steps  # one block; the schedule restarts each block on both sides alike
        cfg.train.eval_every = 0
    return cfg


def is_plain_peft(method: Any) -> bool:
    """Whether the method is PEFT's get_peft_model with its config and nothing more (LoRA and its YAML variants,
    the PEFT tuners): its bare side is then built by PEFT itself."""
    from methods.lora import LoRA
    from methods.peft_tuners import PeftTuner

    return type(method) is LoRA or (isinstance(method, PeftTuner) and type(method).wrap is PeftTuner.wrap)


def peft_model(method: Any, base: nn.Module, ctx: WrapContext) -> nn.Module:
    """The model as a PEFT user builds it: get_peft_model with the method's own config."""
    from peft import get_peft_model

    return get_peft_model(base, method.peft_config(sorted(method.target_layers(base, ctx)), ctx))


def build_sides(method_name: str, cfg: DictConfig) -> tuple[Side, Side, torch.device, torch.dtype | None]:
    """The suite's side (the method, prepared and calibrated as a run does it) and the bare side (the same model
    built without the suite: by PEFT itself for PEFT's methods), from the same seed."""
    suite = prepare(method_name, cfg)
    bare = prepare(method_name, cfg, build_model=peft_model if is_plain_peft(suite.method) else None)
    groups = bare.method.param_groups(bare.model, cfg.train.weight_decay)
    return (Side(suite.model, suite.loader, method=suite.method),
            Side(bare.model, bare.loader, params=[p for g in groups for p in g["params"]], groups=groups),
            suite.device, suite.autocast_dtype)


def suite_block(side: Side, cfg: DictConfig, device: torch.device, autocast_dtype: torch.dtype | None,
                progress: bool) -> list[float]:
    """`steps` steps of the suite's loop; returns the losses."""
    result = train(side.model, side.method, side.loader, cfg.train, device, autocast_dtype, lambda m: {},
                   progress=progress, desc="suite")
    return [point["loss"] for point in result.curve]


def bare_block(side: Side, cfg: DictConfig, device: torch.device, autocast_dtype: torch.dtype | None) -> list[float]:
    """The hand-written loop: same batches, same optimizer, same schedule, same clipping."""
    tcfg = cfg.train
    optimizer = torch.optim.AdamW(side.groups, lr=float(cfg.method.lr))
    warmup = math.ceil(tcfg.warmup_ratio * tcfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(tcfg, warmup))
    data = batches(side.loader)
    side.model.train()
    losses = []
    for step in range(tcfg.max_steps):
        for _ in range(tcfg.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(data).items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = side.model(**batch).loss
            (loss / tcfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(side.params, tcfg.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % tcfg.log_every == 0 or step == 0 or step + 1 == tcfg.max_steps:
            losses.append(loss.detach())  # kept on the device; read once at the end, as a bare loop would log
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [float(x) for x in losses]


def measure(method_name: str, overrides: list[str], steps: int, rounds: int, warmup: int = 1,
            seed: int = 0) -> dict[str, Any]:
    """Interleaved blocks of the suite's and the bare loop for one method; the per-round ratio's median and CI."""
    cfg = compose_cfg(method_name, overrides, steps)
    suite, bare, device, autocast_dtype = build_sides(method_name, cfg)
    progress = bool(cfg.progress) and sys.stderr.isatty()
    order = random.Random(seed)
    times: dict[str, list[float]] = {"suite": [], "bare": []}
    max_gap = 0.0
    for round_index in range(warmup + rounds):
        sides = ["suite", "bare"]
        order.shuffle(sides)
        losses = {}
        for name in sides:
            torch.manual_seed(1000 + round_index)  # the same dropout masks on both sides
            start = time.perf_counter()
            losses[name] = (suite_block(suite, cfg, device, autocast_dtype, progress) if name == "suite"
                            else bare_block(bare, cfg, device, autocast_dtype))
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
        max_gap = max(max_gap, max(abs(a - b) for a, b in zip(losses["suite"], losses["bare"])))
    ratios = [s / b for s, b in zip(times["suite"], times["bare"])]
    low, high = bootstrap_median_ci(ratios, seed=seed)
    return {"method": method_name, "ratio_median": statistics.median(ratios), "ratio_ci95_low": low,
            "ratio_ci95_high": high, "suite_step_s": statistics.median(times["suite"]) / steps,
            "bare_step_s": statistics.median(times["bare"]) / steps, "rounds": rounds, "steps_per_block": steps,
            "max_loss_gap": max_gap}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,full", help="comma-separated conf/method names (default lora,full)")
    parser.add_argument("--steps", type=int, default=20, help="steps per block (default 20)")
    parser.add_argument("--rounds", type=int, default=9, help="measured rounds of one block per loop (default 9)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first rounds (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="output stem: writes <out>.csv and <out>.md")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if not (CONF / "method" / f"{m}.yaml").is_file()]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; options are the files in conf/method/")
    rows = []
    for name in names:
        log.info("measuring %s", name)
        rows.append(measure(name, overrides, args.steps, args.rounds, args.warmup))
    table = pd.DataFrame(rows)
    command = " ".join(["python -m bench.overhead", *(argv if argv is not None else sys.argv[1:])])
    header = (f"Suite loop vs bare PyTorch loop on identical batches, {args.rounds} interleaved rounds of "
              f"{args.steps} steps after {args.warmup} warm-up round(s); ratio = suite time / bare time per round, "
              f"median with a bootstrap 95% CI; torch threads {torch.get_num_threads()}, load average at the end "
              f"{os.getloadavg()[0]:.2f}. max_loss_gap: the largest difference between the two loops' logged "
              f"losses (0 when they did the same arithmetic).\n\n`{command}`\n\n")
    text = header + table.to_markdown(index=False, floatfmt=".4g") + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out.with_suffix(".csv"), index=False)
        args.out.with_suffix(".md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench.steptime`: the training-step time of several methods, measured side by side in one process.

    python -m bench.steptime --methods full,lora,dora,pissa --steps 30 [Hydra overrides, e.g. model=minilm]

Grid cells run one after another, so their step times also measure whatever else the machine did meanwhile. Here
every method is set up as a run would set it up (same config composition, prepare, calibrate, optimizer and
schedule), then the steps are interleaved: each round runs one step of every method, in a fresh random order, and
the time of each step is divided by LoRA's step of the same round. Medians over rounds of those ratios are robust
to load that drifts during the measurement, and each comes with a percentile-bootstrap 95% CI; absolute medians are
printed beside them for reference only. Threads are pinned (--threads, default 1); --ci-width W keeps measuring
until every CI is at most W wide (or --time-cap seconds have passed).
Writes <out>.csv and <out>.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from bench.models import load_model
from bench.run import build, calibration_batches, compose_config, resolve_device, seed_everything, train_loader
from bench.train import Trainer, optimizer_state_bytes
from methods.base import Method, WrapContext

CONF = Path(__file__).resolve().parents[1] / "conf"
REFERENCE = "lora"
log = logging.getLogger("bench.steptime")


@dataclass
class Prepared:
    """One method set up as bench/run.py sets a run up (without the record)."""

    model: nn.Module
    method: Method
    loader: DataLoader
    device: torch.device
    autocast_dtype: torch.dtype | None


def prepare(method_name: str, cfg: DictConfig,
            build_model: Callable[[Method, nn.Module, WrapContext], nn.Module] | None = None) -> Prepared:
    """Seed, build the task and method, load the model, wrap it (`method.prepare`, or `build_model(method, base,
    ctx)`), calibrate it, and make the seeded training loader."""
    seed = int(cfg.seed)
    seed_everything(seed)
    device, autocast_dtype = resolve_device(cfg.device, cfg.precision)
    task = build(cfg.task, "task", "task")
    method = build(cfg.method, "method", method_name)
    loaded = load_model(cfg.model, task.head)
    collate = task.collate_fn(loaded.tokenizer)
    rows = task.examples("train", seed=seed)
    ctx = WrapContext(head_modules=loaded.head_modules, seed=seed)
    model = (build_model(method, loaded.model, ctx) if build_model else method.prepare(loaded.model, ctx)).to(device)
    method.calibrate(model, calibration_batches(rows, collate, cfg.train, seed, device), lambda m, b: m(**b).loss)
    return Prepared(model, method, train_loader(task, rows, collate, cfg.train, seed), device, autocast_dtype)


def setup(method_name: str, overrides: list[str]) -> Trainer:
    """A Trainer for one method, set up as bench/run.py sets up a run (without the record)."""
    cfg = compose_config([f"method={method_name}", *overrides])
    p = prepare(method_name, cfg)
    return Trainer(p.model, p.method, p.loader, cfg.train, p.device, p.autocast_dtype)


def measure(trainers: dict[str, Trainer], steps: int, warmup: int, seed: int = 0, ci_width: float | None = None,
            time_cap: float | None = None) -> pd.DataFrame:
    """Interleaved rounds; per method the median step time and the median of its per-round ratio to LoRA with a
    percentile-bootstrap 95% CI. With `ci_width`, rounds go on past `steps` (in blocks of `steps`) until every CI is at
    most that wide or `time_cap` seconds have passed."""
    order, times = random.Random(seed), {name: [] for name in trainers}
    start = time.perf_counter()

    def run_rounds(count: int, measured: bool) -> None:
        for _ in range(count):
            names = list(trainers)
            order.shuffle(names)
            for name in names:
                seconds = trainers[name].step().seconds
                if measured:
                    times[name].append(seconds)

    def widest() -> float:
        if REFERENCE not in times:
            return 0.0
        widths = [high - low for name, ts in times.items() if name != REFERENCE
                  for low, high in [bootstrap_median_ci(ratios(ts, times[REFERENCE]), seed=seed)]]
        return max(widths, default=0.0)

    run_rounds(warmup, measured=False)
    run_rounds(steps, measured=True)
    while ci_width is not None and widest() > ci_width and (time_cap is None or time.perf_counter() - start < time_cap):
        run_rounds(steps, measured=True)
    rows = []
    for name, ts in times.items():
        row = {"method": name, "rounds": len(ts), "step_s_median": statistics.median(ts),
               "step_s_iqr": float(pd.Series(ts).quantile(0.75) - pd.Series(ts).quantile(0.25)),
               "optimizer_state_bytes": optimizer_state_bytes(trainers[name].optimizer),
               "trainable": sum(p.numel() for p in
                                trainers[name].method.trainable_parameters(trainers[name].model).values())}
        if REFERENCE in times:
            per_round = ratios(ts, times[REFERENCE])
            low, high = bootstrap_median_ci(per_round, seed=seed)
            row.update({f"vs_{REFERENCE}_median": statistics.median(per_round),
                        f"vs_{REFERENCE}_ci95_low": low, f"vs_{REFERENCE}_ci95_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def bootstrap_median_ci(values: list[float], level: float = 0.95, resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of `values`."""
    rng = np.random.default_rng(seed)
    data = np.asarray(values, dtype=float)
    medians = np.median(rng.choice(data, size=(resamples, data.size), replace=True), axis=1)
    return float(np.quantile(medians, (1 - level) / 2)), float(np.quantile(medians, (1 + level) / 2))


def ratios(times: list[float], reference: list[float]) -> list[float]:
    """Each round's step time over the reference method's step of the same round."""
    return [t / r for t, r in zip(times, reference)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.steptime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", required=True, help="comma-separated conf/method names (include lora for ratios)")
    parser.add_argument("--steps", type=int, default=30, help="measured rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured first rounds (default 3)")
    parser.add_argument("--out", type=Path, default=Path("results/steptime"), help="output stem (.csv, .md)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, pinned for the whole run (default 1)")
    parser.add_argument("--ci-width", type=float, default=None,
                        help="go on in blocks of --steps rounds until every ratio's 95%% CI is at most this wide")
    parser.add_argument("--time-cap", type=float, default=600.0, help="seconds after which --ci-width gives up (600)")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if not (CONF / "method" / f"{m}.yaml").is_file()]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; options are the files in conf/method/")
    trainers = {}
    for name in names:
        log.info("setting up %s", name)
        trainers[name] = setup(name, ["progress=false", *overrides])
    table = measure(trainers, args.steps, args.warmup, ci_width=args.ci_width, time_cap=args.time_cap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    command = " ".join(["python -m bench.steptime", *(argv if argv is not None else sys.argv[1:])])
    header = (f"Step time measured side by side (interleaved rounds, random order each round), "
              f"{int(table['rounds'].iloc[0])} rounds after {args.warmup} warm-up rounds; vs_{REFERENCE}: the median "
              f"of the per-round ratios with its percentile-bootstrap 95% CI; torch threads {torch.get_num_threads()}, "
              f"load average at the end {os.getloadavg()[0]:.2f}.\n\n`{command}`\n\n")
    args.out.with_suffix(".md").write_text(header + table.to_markdown(index=False, floatfmt=".3g") + "\n")
    print(header + table.to_markdown(index=False, floatfmt=".3g"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The training loop: AdamW (or the method's optimizer), warmup + linear decay, clipping, accumulation.

It reads top to bottom and never names a method: every method-specific behaviour enters through the hooks of
methods/base.py (extra_loss, on_step_begin, on_after_backward, on_step_end).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bench.distributed import SINGLE, Dist, shard, wrap
from methods.base import Batch, Method

#: a training step's forward: (the model or its DDP wrapper, the batch) -> an output with `.loss` (Task.objective)
Objective = Callable[[Callable[..., Any], Batch], Any]


def model_loss(forward: Callable[..., Any], batch: Batch) -> Any:
    """The default objective: the model's own loss, `forward(**batch).loss`."""
    return forward(**batch)


class Diverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite, or the loss exploded (LossGuard)."""

    def __init__(self, step: int, loss: float, grad_norm: float | None = None, reason: str = "") -> None:
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        what = reason or f"loss={loss}, grad_norm={grad_norm}"
        super().__init__(
            f"training diverged at step {step}: {what}. "
            "Lower method.lr, raise train.warmup_ratio, or check the data."
        )


class LossGuard:
    """Stops a run whose loss explodes (NaN and inf are caught in Trainer.step).

    The rule: once warmup is over, the mean loss of the last `window` optimizer steps must stay below
    FACTOR x the mean loss of the first `window` steps (and at least FACTOR - 1 times max(|that|, FLOOR) above it,
    so that a near-zero or negative early loss does not make the rule fire on noise); window = max_steps // 10,
    between 1 and 10 steps. The loss is the one the optimizer minimises (task loss plus a method's extra terms).
    A normal run never comes near it: a classifier starts at ln(C) and a collapsed one returns to about ln(C);
    only confidently wrong predictions, i.e. a blown-up model, reach 10 x ln(C). Across the 75 committed
    100-step GLUE runs (lr up to sqrt(10) x the default) the largest logged loss was 1.56 x the first; on every
    step of the smoke runs of all methods and of 100-step runs of LoRA, full, SoRA, AdaLoRA, IncreLoRA,
    TriAdaptLoRA and BA-LoRA the windowed mean stayed below 0.17 x the limit (TriAdaptLoRA's growing
    regulariser is the highest). LoRA at lr=1e3 passes it on its second step (loss 0.69 -> 2472).
    """

    FACTOR = 10.0
    FLOOR = 0.1

    def __init__(self, max_steps: int, warmup_steps: int, early: list[float] | None = None) -> None:
        self.window = min(10, max(1, max_steps // 10))
        self.start = max(warmup_steps, self.window)  # first 0-based step that is checked
        self.early = list(early or [])[: self.window]  # the reference losses (kept in TrainResult for resumes)
        self.recent: collections.deque[float] = collections.deque(maxlen=self.window)

    def limit(self) -> float:
        reference = statistics.fmean(self.early)
        return reference + (self.FACTOR - 1) * max(abs(reference), self.FLOOR)

    def update(self, step: int, loss: float) -> None:
        """Feed the loss of 0-based `step`; raises Diverged when the rule fires."""
        if len(self.early) < self.window:
            self.early.append(loss)
        self.recent.append(loss)
        if step < self.start or len(self.recent) < self.window or len(self.early) < self.window:
            return
        reference, current = statistics.fmean(self.early), statistics.fmean(self.recent)
        if current > self.limit():
            span = f"the last {self.window} steps" if self.window > 1 else "this step"
            first = f"the first {self.window} steps" if self.window > 1 else "the first step"
            raise Diverged(step + 1, loss, reason=(
                f"the loss exploded: mean loss of {span} {current:.4g} > {self.FACTOR:g} x that of {first} "
                f"({reference:.4g})"))


class Preempted(RuntimeError):
    """The job was signalled (SLURM's preemption or time-limit signal); a checkpoint was written first."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint {path}; rerun the cell to resume")


@dataclass
class TrainResult:
    curve: list[dict[str, float]] = field(default_factory=list)  # one row per logged step
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # seconds per optimizer step
    tokens: int = 0  # non-padding tokens seen
    train_s: float = 0.0  # wall time of the loop, evaluation excluded
    peak_mem_bytes: int = 0
    peak_mem_kind: str = ""
    optimizer_state_bytes: int = 0  # tensors the optimizer keeps (moments, projections), at the end of training
    resumed_from: list[int] = field(default_factory=list)  # steps this run was resumed from (checkpoints)
    early_losses: list[float] = field(default_factory=list)  # LossGuard's reference: the losses of the first steps

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_times) if self.step_times else float("nan")


class PeakMemory:
    """Peak memory while training: CUDA's allocator peak on a GPU, else the process RSS sampled every 20 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            proc = psutil.Process()

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    self._stop.wait(0.02)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()


def batches(loader: DataLoader) -> Iterator[Batch]:
    """Endless batches, epoch after epoch (the loader's seeded generator reshuffles each epoch)."""
    while True:
        yield from loader


def warmup_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def warmup_cosine_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The same warmup, then ½(1 + cos(π·p)) with p the fraction of the decay done (transformers'
    get_cosine_schedule_with_warmup, which PEFT's method comparison uses)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


#: train.lr_schedule -> the lr factor of each 0-based step, from the warmup steps and the run's steps
SCHEDULES: dict[str, Callable[[int, int], Callable[[int], float]]] = {
    "linear": warmup_linear_decay, "cosine": warmup_cosine_decay}


def lr_factor(cfg: Any, warmup_steps: int) -> Callable[[int], float]:
    """The schedule train.lr_schedule names (linear where the config predates the key)."""
    name = getattr(cfg, "lr_schedule", None) or "linear"
    if name not in SCHEDULES:
        raise ValueError(f"train.lr_schedule={name!r}: choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](warmup_steps, int(cfg.max_steps))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (Adam moments, projection matrices, ...), plus
    the tensors it shares between parameters where it lists them (`shared_tensors`, e.g. a fixed DCT basis)."""
    total = sum(t.numel() * t.element_size() for t in getattr(optimizer, "shared_tensors", ()))
    for state in optimizer.state.values():
        for value in state.values() if isinstance(state, dict) else ():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def rebuild_optimizer(method: Method, model: nn.Module, old: torch.optim.Optimizer,
                      weight_decay: float) -> torch.optim.Optimizer:
    """A new optimizer over the current trainable set that keeps the state of every surviving parameter."""
    new = method.make_optimizer(model, weight_decay=weight_decay)
    for group_new in new.param_groups:  # keep the scheduled lr, not the initial one
        group_new["lr"] = old.param_groups[0]["lr"]
        group_new.setdefault("initial_lr", old.param_groups[0].get("initial_lr", group_new["lr"]))
    for p in (p for g in new.param_groups for p in g["params"]):
        if p in old.state:
            new.state[p] = old.state[p]
    return new


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float  # the learning rate the step used
    tokens: int  # non-padding tokens of the step's micro-batches
    seconds: float  # wall time of the step (synchronised on a GPU)


class Trainer:
    """One optimizer step at a time: the method's optimizer under warmup + decay (train.lr_schedule), over endless
    batches.

    `train()` drives it for a whole run; the step-time benchmark (bench/steptime.py) interleaves several.
    Under a multi-process strategy (bench/distributed.py) each process takes its share of every global batch and
    calls forward through the DDP wrapper; the loss and token counts it reports are those of the global batch.
    """

    def __init__(self, model: nn.Module, method: Method, loader: DataLoader, cfg: Any, device: torch.device,
                 autocast_dtype: torch.dtype | None, dist: Dist = SINGLE, objective: Objective | None = None) -> None:
        self.model, self.method, self.cfg, self.device, self.autocast_dtype = model, method, cfg, device, autocast_dtype
        self.dist = dist
        self.objective = objective or model_loss  # the task's (Task.objective): model(**batch) unless it has its own
        self.optimizer = method.make_optimizer(model, weight_decay=cfg.weight_decay)
        self.warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.warmup))
        self.data = shard(batches(loader), dist)
        self.forward = wrap(model, dist, device)  # the model itself in one process
        self.step_index = 0
        model.train()  # every module (a wrapper such as PEFT's may sit in train mode around a base left in eval)

    def step(self) -> StepResult:
        model, method, cfg, device, step = self.model, self.method, self.cfg, self.device, self.step_index
        if not model.training:  # the walk over every module again only after an evaluation left the model in eval
            model.train()
        t0 = time.perf_counter()
        method.on_step_begin(model, step)

        # forward / backward over grad_accum micro-batches
        losses, step_tokens = [], 0
        for micro in range(cfg.grad_accum):
            host, weight = next(self.data)  # weight: 1 in one process (bench.distributed.shard)
            step_tokens += sum(int(v.sum()) for k, v in host.items()  # on the host: no sync; retain_ rows count too
                               if k.endswith("attention_mask"))
            batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
            last = micro + 1 == cfg.grad_accum
            sync = self.forward.no_sync() if self.forward is not model and not last else contextlib.nullcontext()
            with sync, torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                outputs = self.objective(self.forward, batch)
                loss = outputs.loss * weight if weight != 1.0 else outputs.loss
                extra = method.extra_loss(model, batch, outputs)
                if extra is not None:
                    loss = loss + extra
                (loss / cfg.grad_accum).backward()
            losses.append(loss.detach())
        local = torch.stack(losses).double().sum() / cfg.grad_accum
        if self.dist.active:  # the global batch's loss and tokens: one all-reduce of two numbers
            total = self.dist.sum(torch.stack([local, local.new_tensor(float(step_tokens))]).to(self.dist.device_hint))
            step_loss, step_tokens = total[0].item() / self.dist.world, int(total[1].item())
        else:
            step_loss = local.item()  # one device sync per step
        if not math.isfinite(step_loss):
            raise Diverged(step, step_loss)

        # update
        method.on_after_backward(model, step)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
        if not math.isfinite(grad_norm):
            raise Diverged(step, step_loss, grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if method.on_step_end(model, step, self.optimizer):
            self.optimizer = rebuild_optimizer(method, model, self.optimizer, cfg.weight_decay)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.warmup),
                                                               last_epoch=step)
            if self.forward is not model:  # a new trainable set: DDP registers its gradient hooks anew
                self.forward = wrap(model, self.dist, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.step_index += 1
        return StepResult(step_loss, grad_norm, lr, step_tokens, time.perf_counter() - t0)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, trainer: Trainer, result: TrainResult) -> None:
    """Everything a resumed run needs to continue bit-for-bit (on a deterministic device): the trainable tensors,
    the method's own state, optimizer, schedule, step, data position, RNG states and the result so far.
    Written to a temporary file and renamed, so a kill during the write leaves the previous checkpoint intact."""
    state = {
        "step": trainer.step_index,
        "trainable": trainer.method.adapter_state_dict(trainer.model),
        "method": trainer.method.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": rng_state(),
        "result": asdict(result),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: two runs of one cell never share it
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(checkpoint: Path) -> None:
    """Delete checkpoint.pt.<pid>.tmp files of processes that no longer run (a kill -9 during a save)."""
    for tmp in checkpoint.parent.glob(f"{checkpoint.name}.*.tmp"):
        pid = tmp.name[len(checkpoint.name) + 1: -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, model: nn.Module, method: Method, loader: DataLoader, cfg: Any,
                    device: torch.device, autocast_dtype: torch.dtype | None,
                    dist: Dist = SINGLE, objective: Objective | None = None) -> tuple[Trainer, TrainResult]:
    """A Trainer positioned where the checkpoint was taken. The method's state is loaded first (it may restore
    structure: masks, ranks, active layers), then the trainable tensors, then the optimizer over that trainable set;
    the data iterator is advanced past the batches already seen before the RNG states are restored."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    method.load_state_dict(state["method"])
    method.load_adapter_state_dict(model, state["trainable"])
    trainer = Trainer(model, method, loader, cfg, device, autocast_dtype, dist, objective)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    for _ in range(state["step"] * cfg.grad_accum):
        next(trainer.data)
    trainer.step_index = state["step"]
    set_rng_state(state["rng"])
    return trainer, TrainResult(**state["result"])


class _Signals:
    """Remembers SIGTERM / SIGUSR1 / SIGUSR2 (SLURM's preemption signal; the pre-time-limit signal of our launchers
    and of submitit's) until the current step ends;
    the previous handlers are restored on exit so that the caller can pass the signal on."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                getattr(signal, "SIGUSR2", None)) if s is not None)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous.clear()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    model: nn.Module,
    method: Method,
    loader: DataLoader,
    cfg: Any,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    evaluate: Callable[[nn.Module], dict[str, float]],
    progress: bool = True,
    desc: str = "train",
    checkpoint: Path | None = None,
    on_log: Callable[[int, dict[str, Any]], None] | None = None,
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    dist: Dist = SINGLE,
    objective: Objective | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train `model` for cfg.max_steps optimizer steps of cfg.grad_accum micro-batches each.

    With `checkpoint` set, a checkpoint is written every cfg.checkpoint_every steps and when the process receives
    SIGTERM, SIGUSR1 or SIGUSR2 (then Preempted is raised); an existing checkpoint is resumed from. It is deleted when
    training ends. `on_log(step, row)` is called with every curve row and eval_history row as it is appended
    (bench/trackers.py mirrors them to W&B or MLflow). `on_eval(step, metrics)` sees every periodic evaluation and
    may stop training by raising (a tuning trial's pruner raises bench.tuning.Pruned); the checkpoint is then removed.
    `objective(forward, batch)` is the step's forward (the task's Task.objective; default the model's own loss).
    `on_step(step)` runs after every optimizer step (1-based) in the main process (adapter snapshots).
    """
    every = int(getattr(cfg, "checkpoint_every", 0) or 0)
    resumed = None
    if checkpoint is not None:
        remove_stale_temporaries(checkpoint)
        if checkpoint.exists():
            try:
                resumed = load_checkpoint(checkpoint, model, method, loader, cfg, device, autocast_dtype, dist,
                                          objective)
            except FileNotFoundError:  # another run of this cell finished and removed it meanwhile: start over
                resumed = None
    if resumed is not None:
        trainer, result = resumed
        result.resumed_from.append(trainer.step_index)
    else:
        trainer, result = Trainer(model, method, loader, cfg, device, autocast_dtype, dist, objective), TrainResult()
    progress = progress and dist.main  # one bar per cell
    bar = tqdm(total=cfg.max_steps, initial=trainer.step_index, desc=desc, disable=not progress, dynamic_ncols=True)
    guard = LossGuard(cfg.max_steps, trainer.warmup, result.early_losses)
    with PeakMemory(device) as memory, _Signals() as signals:
        for step in range(trainer.step_index, cfg.max_steps):
            try:
                out = trainer.step()  # raises Diverged on a NaN or infinite loss or gradient norm
                guard.update(step, out.loss)  # ... and on an exploding loss
            except Diverged as e:
                e.train_result = result  # type: ignore[attr-defined]  # the curve so far, for the record
                bar.close()
                raise
            result.early_losses = guard.early
            result.step_times.append(out.seconds)
            result.tokens += out.tokens
            if (step + 1) % cfg.log_every == 0 or step == 0 or step + 1 == cfg.max_steps:
                result.curve.append({"step": step + 1, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm})
                if on_log is not None:
                    on_log(step + 1, result.curve[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{out.lr:.2e}")
            if on_step is not None and dist.main:
                on_step(step + 1)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
                result.eval_history.append({"step": step + 1, "metrics": evaluate(model)})
                if on_log is not None:
                    on_log(step + 1, result.eval_history[-1])
                bar.write(f"step {step + 1}: {result.eval_history[-1]['metrics']}")
                model.train()
                if on_eval is not None:
                    try:
                        on_eval(step + 1, result.eval_history[-1]["metrics"])
                    except BaseException as e:
                        e.train_result = result  # type: ignore[attr-defined]  # the curve so far, for the record
                        bar.close()
                        if checkpoint is not None:
                            checkpoint.unlink(missing_ok=True)
                        raise
            if checkpoint is not None and step + 1 < cfg.max_steps:
                if dist.any_flag(signals.received is not None):  # every process stops at the same step
                    if dist.main:
                        save_checkpoint(checkpoint, trainer, result)
                    dist.barrier()
                    bar.close()
                    raise Preempted(signals.received or signal.SIGTERM, step + 1, checkpoint)
                if every and (step + 1) % every == 0 and dist.main:
                    save_checkpoint(checkpoint, trainer, result)
    bar.close()
    result.train_s = sum(result.step_times)
    result.peak_mem_bytes = max(result.peak_mem_bytes, memory.peak)
    result.peak_mem_kind = memory.kind
    result.optimizer_state_bytes = optimizer_state_bytes(trainer.optimizer)
    if checkpoint is not None and dist.main:
        checkpoint.unlink(missing_ok=True)
    return result

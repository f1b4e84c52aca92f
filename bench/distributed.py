"""Multi-process cells: one cell trained by N processes under torchrun, with DDP doing the work.

    python -m bench train.strategy=ddp train.nproc=2                 # one cell, 2 processes (gloo on the CPU)
    python -m bench train.strategy=ddp train.nproc=8 device=cuda -m method=lora,full   # a grid, 8 GPUs per cell

What the suite does and what the engine does:

* The cell's job (any Hydra launcher: basic, submitit local or SLURM) re-executes itself under
  `torch.distributed.run` (torchrun) with `train.nproc` processes on its node (`launch`), waits, and returns the
  record rank 0 wrote. Inside, each process joins the process group torchrun set up (`join`: NCCL on CUDA, gloo on
  the CPU) and trains the same model: DDP (`torch.nn.parallel.DistributedDataParallel`) averages the gradients.
  Sharding (FSDP2's `fully_shard`, `train.strategy=fsdp`) is not built yet.
* `train.batch_size` stays the global micro-batch: every process builds the same seeded global batch and keeps
  its 1/N of the rows (`shard`), so N processes see exactly the examples one process sees, in the same order; each
  local mean loss is weighted by its share of the batch's loss units, so the mean over processes is the one-process
  loss and gradient, to floating-point reduction order.
* Every process seeds the same RNG stream, so methods' random choices (DyLoRA's rank, LISA's layers) agree across
  processes without communication; dropout masks of the processes' rows come from that one stream too.
* Rank 0 writes the record, the checkpoint and the adapter; every process resumes from the same checkpoint; a
  stop signal on any process stops all of them at the same step (`any_flag`). Periodic evaluations run on every
  process (a pruner decides the same way everywhere); the final evaluation, post-training and export on rank 0.
* A method whose trainable set changes mid-run (LISA, IncreLoRA, TriAdaptLoRA) gets its DDP wrapper rebuilt with its
  new optimizer. Methods that read gradients (GaLore's projections, LoRA-Pro) see DDP's averaged, whole gradients,
  so they need nothing of their own; every process computes the same update.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

STRATEGIES = ("single", "ddp")


@dataclass(frozen=True)
class Dist:
    """This process's place in its cell: rank, world size, local rank (its GPU) and the strategy."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "single"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """In a process group (even of one process: train.strategy=ddp train.nproc=1)."""
        return self.strategy != "single"

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the processes (a no-op in one process)."""
        if not self.active:
            return values
        import torch.distributed as td

        out = values.detach().clone()
        td.all_reduce(out, op=td.ReduceOp.SUM)
        return out

    def any_flag(self, flag: bool) -> bool:
        """True on every process when it is True on any (a stop signal that reached only some of them)."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0], device=self.device_hint)).item() > 0)

    @property
    def device_hint(self) -> torch.device:
        import torch.distributed as td

        return torch.device("cuda", self.local_rank) if td.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()


SINGLE = Dist()


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def check(strategy: str, nproc: int, batch_size: int) -> str | None:
    """What is wrong with a strategy / process count / batch size (None when nothing is)."""
    if strategy not in STRATEGIES:
        return f"train.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}"
    if nproc < 1:
        return f"train.nproc must be >= 1, got {nproc}"
    if strategy == "single" and nproc != 1:
        return f"train.nproc={nproc} needs train.strategy=ddp (train.strategy=single is one process)"
    if batch_size % nproc:
        return (f"train.batch_size={batch_size} must be divisible by train.nproc={nproc}: it is the global "
                "micro-batch, split evenly over the processes")
    return None


def join(strategy: str, device: torch.device) -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU); one process stays SINGLE."""
    if strategy == "single" or not under_torchrun():  # bench.run launches a multi-process strategy under torchrun
        return SINGLE
    import torch.distributed as td

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, strategy)


def process_device(dist: Dist, device: torch.device) -> torch.device:
    """The process's own GPU (cuda:<local rank>) in a multi-process cell; `device` otherwise."""
    return torch.device("cuda", dist.local_rank) if dist.world > 1 and device.type == "cuda" else device


def finish(dist: Dist) -> None:
    if dist.active:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def loss_units(batch: Mapping[str, torch.Tensor]) -> int:
    """What the model's mean loss averages over: the rows, or a causal LM's predicted tokens (labels shifted by one,
    -100 ignored)."""
    labels = batch.get("labels")
    if labels is not None and labels.dim() >= 2:
        return int((labels[:, 1:] != -100).sum())
    return int(next(iter(batch.values())).shape[0])


def shard(batches: Iterator[Mapping[str, torch.Tensor]], dist: Dist) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """This process's rows of every global batch (the r-th of N contiguous chunks, sizes differing by at most one)
    and the weight of its mean loss, N · (its loss units) / (the batch's): DDP's mean of the weighted gradients is
    then the gradient of the global batch's mean loss even when the chunks are unequal (an epoch's last batch, a
    causal LM's token counts)."""
    for batch in batches:
        if dist.world == 1:
            yield dict(batch), 1.0
            continue
        rows = next(iter(batch.values())).shape[0]
        if rows < dist.world:
            raise ValueError(f"a batch of {rows} rows cannot feed {dist.world} processes; raise train.batch_size "
                             "or lower train.nproc")
        chunks = [torch.tensor_split(v, dist.world)[dist.rank] for v in batch.values()]
        mine = dict(zip(batch.keys(), chunks))
        total = loss_units(batch)
        yield mine, dist.world * loss_units(mine) / total if total else 1.0


def wrap(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """What the training step calls forward on: DDP around the model (the model itself stays what methods,
    evaluation and checkpoints see); the model itself in one process."""
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def launch(overrides: list[str], nproc: int, run_dir: str) -> int:
    """Run the cell `overrides` under torchrun with `nproc` processes on this node; each rank's Hydra output goes to
    <run_dir>/rank<r>. Returns torchrun's exit status (a stop signal is passed on to it)."""
    import signal

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bench", *overrides, f"hydra.run.dir={run_dir}/rank" + "${oc.env:RANK}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    child = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: Any) -> None:  # SLURM's preemption signal reaches the processes that train
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

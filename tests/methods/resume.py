"""Checkpoint-and-resume check for methods with their own state (growing ranks, samplers, allocators): the pattern of
tests/bench/test_checkpoint.py, driven in-process. Not a test module: the method tests call it."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bench.train import TrainResult, train
from methods.base import Method
from tests.helpers import tiny, wrapped


class Killed(RuntimeError):
    pass


def _cfg(steps: int, every: int, **train_keys: Any) -> SimpleNamespace:
    keys = dict(max_steps=steps, grad_accum=1, warmup_ratio=0.2, weight_decay=0.01, max_grad_norm=1.0, log_every=1,
                eval_every=0, checkpoint_every=every)
    return SimpleNamespace(**{**keys, **train_keys})


def _saved(method: Method, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in method.saved_parameters(model).items()}


def resume_matches_uninterrupted(method_name: str, extra: list[str], tmp_path: Path, steps: int, every: int,
                                 die_after: int, **train_keys: Any
                                 ) -> tuple[tuple[Method, torch.nn.Module], tuple[Method, torch.nn.Module]]:
    """Train `steps` uninterrupted; train again with a checkpoint every `every` steps and a kill after `die_after`;
    resume on a freshly wrapped model; assert the curves, the method state and every saved tensor (the trainable
    ones and what the method adds: Method.saved_parameters) agree exactly. `train_keys` override the loop's settings
    (grad_accum, warmup_ratio, weight_decay, ...). Returns (uninterrupted, resumed) as (method, model) pairs."""
    extra = [*extra, f"train.max_steps={steps}"]  # YAMLs that interpolate train.max_steps see the run's length
    cfg = _cfg(steps, every, **train_keys)
    t = tiny(method_name, extra=extra)
    torch.manual_seed(0)
    method, model = wrapped(t)
    whole: TrainResult = train(model, method, t.loader, cfg, torch.device("cpu"), None, lambda m: {}, progress=False)

    ckpt = tmp_path / "checkpoint.pt"
    t1 = tiny(method_name, extra=extra)
    torch.manual_seed(0)
    dying, m1 = wrapped(t1)
    original = dying.on_step_end

    def on_step_end(model: torch.nn.Module, step: int, optimizer: Any) -> bool:
        rebuild = original(model, step, optimizer)
        if step + 1 == die_after:
            raise Killed(f"killed after step {step + 1}")
        return rebuild

    dying.on_step_end = on_step_end  # type: ignore[method-assign]
    with pytest.raises(Killed):
        train(m1, dying, t1.loader, cfg, torch.device("cpu"), None, lambda m: {}, progress=False, checkpoint=ckpt)
    assert ckpt.exists()

    t2 = tiny(method_name, extra=extra)
    torch.manual_seed(123)  # a restarted job does not share the first one's RNG
    method2, model2 = wrapped(t2)
    resumed = train(model2, method2, t2.loader, cfg, torch.device("cpu"), None, lambda m: {}, progress=False,
                    checkpoint=ckpt)
    assert resumed.resumed_from == [every * ((die_after - 1) // every)] and not ckpt.exists()
    assert [r["loss"] for r in resumed.curve] == [r["loss"] for r in whole.curve]
    a, b = _saved(method, model), _saved(method2, model2)
    assert list(a) == list(b), "the resumed model has a different trainable (saved) set"
    for name in a:
        assert a[name].shape == b[name].shape and torch.equal(a[name], b[name]), name
    assert _comparable(method.state_dict()) == _comparable(method2.state_dict())
    return (method, model), (method2, copy.deepcopy(model2))


def _comparable(x: Any) -> Any:
    """Nested state with tensors turned into lists, for ==."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _comparable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_comparable(v) for v in x]
    return x

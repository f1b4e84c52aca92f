"""The training loop's pieces: the schedule, optimizer rebuilds, gradient accumulation, the hooks."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.train import rebuild_optimizer, warmup_linear_decay
from methods.lora import LoRA
from tests.helpers import logits, tiny, train_steps, wrapped


def test_warmup_then_linear_decay_to_zero():
    f = warmup_linear_decay(warmup_steps=4, total_steps=10)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(7) == pytest.approx(0.5) and f(10) == 0.0


def test_rebuild_keeps_state_of_surviving_parameters():
    t = tiny("lora")
    method, model = wrapped(t)
    train_steps(model, method, t.loader, steps=2)
    opt = method.make_optimizer(model)
    loss = model(**t.batch).loss
    loss.backward()
    opt.step()
    frozen = next(p for n, p in model.named_parameters() if "lora_A" in n)
    frozen.requires_grad_(False)  # the trainable set shrinks, as pruning or layer sampling do
    new = rebuild_optimizer(method, model, opt, weight_decay=0.0)
    kept = [p for g in new.param_groups for p in g["params"]]
    assert all(p is not frozen for p in kept)  # identity: `in` would compare tensors elementwise
    assert len(kept) == len([p for g in opt.param_groups for p in g["params"]]) - 1
    for p in kept:
        assert new.state[p] is opt.state[p]


class CountingLoRA(LoRA):
    """LoRA that counts hook calls and asks for one optimizer rebuild."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = {"begin": 0, "after_backward": 0, "end": 0, "extra": 0}

    def on_step_begin(self, model, step):
        self.calls["begin"] += 1

    def extra_loss(self, model, batch, outputs):
        self.calls["extra"] += 1
        return None

    def on_after_backward(self, model, step):
        self.calls["after_backward"] += 1

    def on_step_end(self, model, step, optimizer):
        self.calls["end"] += 1
        return step == 1


def test_loop_calls_every_hook_once_per_step_and_micro_batch():
    t = tiny("lora")
    method = CountingLoRA(lr=1e-3, r=2)
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    result = train_steps(model, method, t.loader, steps=4)
    assert method.calls == {"begin": 4, "after_backward": 4, "end": 4, "extra": 4}
    assert [c["step"] for c in result.curve] == [1, 2, 3, 4] and len(result.step_times) == 4
    assert not torch.allclose(logits(model, t.batch), logits(t.base, t.batch))

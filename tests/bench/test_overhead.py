"""bench.overhead: the suite's loop and the bare loop do the same arithmetic on the same batches (so their time
ratio compares like with like), the PEFT methods' bare side is PEFT's own model, and the interval is a real one."""

from __future__ import annotations

import math

import pytest
import torch

from bench.overhead import build_sides, compose_cfg, is_plain_peft, measure
from bench.steptime import bootstrap_median_ci
from bench.train import Trainer

SMOKE = ["model=tiny_bert", "+experiment=smoke"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_suite_and_bare_loops_agree_and_the_ratio_is_measured(method):
    row = measure(method, SMOKE, steps=3, rounds=2, warmup=0)
    assert row["max_loss_gap"] == 0.0, "the two loops did different arithmetic"
    assert math.isfinite(row["ratio_median"]) and row["ratio_median"] > 0
    assert row["ratio_ci95_low"] <= row["ratio_median"] <= row["ratio_ci95_high"]
    assert row["suite_step_s"] > 0 and row["bare_step_s"] > 0


def test_bare_side_of_a_peft_method_is_peft_itself():
    from peft import PeftModel

    cfg = compose_cfg("lora", SMOKE, steps=2)
    suite, bare, *_ = build_sides("lora", cfg)
    assert isinstance(bare.model, PeftModel) and bare.method is None
    assert [n for n, p in suite.model.named_parameters() if p.requires_grad] == \
        [n for n, p in bare.model.named_parameters() if p.requires_grad]
    lora_ga = compose_cfg("lora_ga", SMOKE, steps=2)
    from bench.run import build

    assert is_plain_peft(build(cfg.method, "method", "lora"))
    assert not is_plain_peft(build(lora_ga.method, "method", "lora_ga"))  # its own init: built by the method


def test_bootstrap_interval_of_the_median():
    low, high = bootstrap_median_ci([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98])
    assert 0.9 <= low <= 1.0 <= high <= 1.1
    assert bootstrap_median_ci([2.0] * 5) == (2.0, 2.0)


def test_trainer_puts_every_module_in_train_mode_once():
    """A wrapper in train mode around a base left in eval (as get_peft_model leaves an HF model) still trains with
    dropout: the Trainer walks the modules once, then only after an evaluation."""
    cfg = compose_cfg("lora", SMOKE, steps=2)
    suite, *_ = build_sides("lora", cfg)
    suite.model.eval()
    suite.model.training = True  # the wrapper says train, every module inside says eval
    trainer = Trainer(suite.model, suite.method, suite.loader, cfg.train, torch.device("cpu"), None)
    assert all(m.training for m in suite.model.modules())
    suite.model.eval()  # what an evaluation leaves behind
    trainer.step()
    assert all(m.training for m in suite.model.modules())

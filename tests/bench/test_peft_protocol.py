"""PEFT's method-comparison setting as a protocol (conf/protocol/peft_metamath*.yaml): the settings it composes,
the cosine schedule it needs, its prompt template, the refusals (another task, the tuning sweeper), and an offline
run end to end on the tiny Llama."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from bench.run import run
from bench.train import lr_factor, warmup_cosine_decay
from bench.validate import config_problems
from tasks.generative import PEFT_METAMATH_PROMPT, encode
from tests.helpers import compose_cfg


def test_cosine_schedule_warms_up_then_follows_half_a_cosine_to_zero():
    f = warmup_cosine_decay(10, 110)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert all(f(s) >= f(s + 1) for s in range(10, 110))  # never rises after the warmup


def test_the_schedule_is_chosen_by_train_lr_schedule():
    cfg = compose_cfg(["train.lr_schedule=cosine", "train.max_steps=100"]).train
    assert lr_factor(cfg, 0)(50) == pytest.approx(0.5)
    assert lr_factor(compose_cfg(["train.max_steps=100"]).train, 0)(50) == pytest.approx(0.5)  # linear: (100-50)/100
    assert lr_factor(compose_cfg(["train.max_steps=100"]).train, 0)(75) == pytest.approx(0.25)
    assert any("train.lr_schedule" in p for p in config_problems(compose_cfg(["train.lr_schedule=step"]), {}))


@pytest.mark.parametrize("protocol,steps,source", [("peft_metamath", 5000, "meta-math/MetaMathQA"),
                                                    ("peft_metamath_small", 200, "offline")])
def test_the_protocol_composes_pefts_setting(protocol, steps, source):
    cfg = compose_cfg(["task=gsm8k", f"protocol={protocol}", "method=lora"])
    t = cfg.train
    assert (t.max_steps, t.batch_size, t.warmup_ratio, t.lr_schedule, t.weight_decay, t.max_grad_norm) == (
        steps, 4, 0.1, "cosine", 0.1, 1.0)
    assert cfg.method.lr == 1e-4 and cfg.task.prompt_format == "peft_metamath" and cfg.task.train_source == source
    assert config_problems(cfg, {"task": "gsm8k", "method": "lora", "model": "smollm2"}) == []


def test_a_peft_experiments_cosine_scheduler_maps_onto_train_lr_schedule():
    from methods.peft_config import training_overrides

    mapped, ignored = training_overrides({"lr_scheduler": "cosine", "optimizer_kwargs": {"lr": 3e-4}})
    assert mapped == {"train.lr_schedule": "cosine", "method.lr": 3e-4} and ignored == []


def test_the_protocol_refuses_another_task():
    cfg = compose_cfg(["task=glue/sst2", "protocol=peft_metamath_small", "method=lora", "~task.train_source",
                       "~task.prompt_format", "~task.max_new_tokens", "~task.max_eval_samples"])
    problems = config_problems(cfg, {"task": "glue/sst2", "method": "lora", "model": "minilm"})
    assert any("add task=gsm8k" in p for p in problems)


def test_the_template_is_pefts():
    from bench.models import load_model
    from tasks.base import HeadSpec

    tok = load_model(compose_cfg(["model=tiny_llama"]).model, HeadSpec(kind="causal_lm")).tokenizer
    prompt, response = encode(tok, "What is 2 + 3?", "2 + 3 = 5. The answer is: 5", "peft_metamath", "train")
    assert PEFT_METAMATH_PROMPT == "Question: {instruction} Think step by step.\nAnswer:"  # PEFT's query_template
    assert tok.decode(prompt, skip_special_tokens=True) == PEFT_METAMATH_PROMPT.format(instruction="What is 2 + 3?")
    assert tok.decode(response, skip_special_tokens=True) == " 2 + 3 = 5. The answer is: 5"
    assert response[-1] == tok.eos_token_id


def test_the_tuning_sweeper_refuses_a_fixed_setting(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", "hydra/sweeper=tune", "protocol=peft_metamath_small",
                          "task=gsm8k", "method=lora", "model=tiny_llama", f"results_dir={tmp_path}", "-m"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "not a tuning protocol" in out.stderr + out.stdout


@pytest.mark.integration
def test_an_offline_run_under_the_protocol(tmp_path):
    record = run(compose_cfg(["task=gsm8k", "protocol=peft_metamath_small", "method=lora", "model=tiny_llama",
                              f"results_dir={tmp_path}", "progress=false", "train.max_steps=4", "train.log_every=1",
                              "task.max_eval_samples=4", "task.max_new_tokens=8", "task.max_train_samples=32",
                              "task.probe_samples=0"]))
    assert record["status"] == "completed", record["error"]
    assert record["tuning"]["protocol"] == "peft_metamath_small"
    # 4 steps, ⌈0.1·4⌉ = 1 warmup step, then ½(1 + cos(π·p)) for p = 0, 1/3, 2/3 at PEFT's lr 1e-4
    assert [p["lr"] for p in record["curve"]] == pytest.approx([1e-4, 1e-4, 0.75e-4, 0.25e-4])


def test_only_protocols_with_trials_count_as_tuned():
    from analysis.records import is_tuning_protocol

    assert is_tuning_protocol("cheap") and is_tuning_protocol("paper")
    assert not any(is_tuning_protocol(p) for p in ("none", "untuned", "peft_metamath", "peft_metamath_small",
                                                    "no_such_protocol", None))

"""bench/validate.py: every numeric key of train.*, the task and each method is checked before anything loads.

A property-style test: random invalid values (negative, zero where the domain excludes it, non-integers for
counts, past an upper bound, NaN, ±inf, strings) for every numeric key of conf/config.yaml's train block and of
every method YAML must raise a ConfigError that names the key; the YAML defaults themselves must pass.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
from omegaconf import OmegaConf, open_dict

from bench.validate import (FINITE, METHOD_RULES, TRAIN_RULES, ConfigError, Rule, method_rule, task_rule,
                            validate_config, yaml_defaults)
from tests.helpers import CONF, METHODS, compose_cfg

#: Numeric method keys no rule narrows: only finiteness is checked (vera's d may start negative or at any scale).
FINITE_ONLY = {"d_initial"}
STRINGS = ("abc", "1e-3x", "", "nan?")


def numeric_keys(mapping: dict) -> list[str]:
    return [k for k, v in mapping.items()
            if not k.startswith("_") and k != "search" and isinstance(v, (int, float)) and not isinstance(v, bool)]


def invalid_values(rule: Rule, rng: random.Random) -> list[object]:
    """Random values outside `rule`'s domain (each checked against the rule, so the test states no domain twice)."""
    candidates: list[object] = [float("nan"), float("inf"), -float("inf"), rng.choice(STRINGS), True]
    candidates += [-rng.uniform(1e-6, 1e3), -rng.randint(1, 10**6), 0, 0.0]
    if rule.integer:
        candidates += [rng.randint(1, 50) + 0.5]
    if rule.high is not None:
        candidates += [rule.high + rng.uniform(1e-3, 10)]
        if rule.high_open:
            candidates += [rule.high]
    if rule.low is not None and rule.low_open:
        candidates += [rule.low]
    return [v for v in candidates if v is None or rule.problem(v) is not None]


def names(method: str, task: str = "glue/sst2") -> dict[str, str]:
    return {"method": method, "task": task, "model": "tiny_bert"}


def assert_rejected(cfg, group: str, key: str, value: object, option_names: dict[str, str]) -> None:
    node = cfg[group]
    old = node[key]
    with open_dict(node):
        node[key] = value
    try:
        with pytest.raises(ConfigError) as info:
            validate_config(cfg, option_names)
        message = str(info.value)
        assert f"{group}.{key}=" in message, message  # names the key ...
        assert "set " in message, message  # ... and the fix
        assert "\n" not in message
    finally:
        node[key] = old


@functools.cache
def method_cfg(method: str):
    """The smoke config of a method, composed once (tests put back every value they change)."""
    return compose_cfg([f"method={method}", "model=tiny_bert", "+experiment=smoke"])


@pytest.fixture(scope="module")
def smoke_cfg():
    return compose_cfg(["method=lora", "model=tiny_bert", "+experiment=smoke"])


def test_every_default_config_is_valid():
    for method in METHODS:
        validate_config(method_cfg(method), names(method))
    for task in ("glue/mnli", "gsm8k", "commonsense", "dreambooth", "vision/cifar10", "vision/pets"):
        validate_config(compose_cfg([f"task={task}"]), names("lora", task))
    for experiment in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        validate_config(compose_cfg([f"+experiment={experiment}"]), names("lora"))
    for protocol in ("cheap", "paper", "sharp"):
        validate_config(compose_cfg([f"protocol={protocol}"]), names("lora"))


def test_random_invalid_train_values_name_the_key(smoke_cfg):
    rng = random.Random(0)
    base = OmegaConf.load(CONF / "config.yaml").train
    keys = numeric_keys(OmegaConf.to_container(base))
    assert set(keys) <= set(TRAIN_RULES) and {"max_steps", "batch_size", "warmup_ratio"} <= set(keys)
    for key in keys:
        for value in invalid_values(TRAIN_RULES[key], rng):
            assert_rejected(smoke_cfg, "train", key, value, names("lora"))


@pytest.mark.parametrize("method", METHODS)
def test_random_invalid_method_values_name_the_key(method):
    rng = random.Random(method)
    cfg = method_cfg(method)
    defaults, _ = yaml_defaults("method", method)
    keys = numeric_keys(defaults)
    for key in keys:
        rule = method_rule(key)
        assert rule is not FINITE or key in FINITE_ONLY, f"{method}.{key} has no rule: add one to bench/validate.py"
        values = invalid_values(rule, rng)
        for value in rng.sample(values, min(4, len(values))) + [float("nan"), "abc"]:
            assert_rejected(cfg, "method", key, value, names(method))


def test_the_core_domains():
    """lr > 0 and finite, ranks >= 1, alpha > 0, dropout in [0, 1), steps and batch sizes >= 1."""
    assert method_rule("lr").problem(0) and method_rule("lr").problem(1e-9) is None
    assert method_rule("gate_lr").problem(-1e-3) and method_rule("compensation_lr").problem(math.inf)
    for rank in ("r", "r_lora", "init_r", "target_rank", "eora_rank", "inference_rank"):
        assert method_rule(rank).problem(0) and method_rule(rank).problem(2.5) and method_rule(rank).problem(1) is None
    assert method_rule("lambda_rank").problem(5e-4) is None  # a weight, not a rank
    assert method_rule("alpha").problem(0) and METHOD_RULES["dropout"].problem(1.0)
    assert METHOD_RULES["dropout"].problem(0.0) is None
    assert TRAIN_RULES["max_steps"].problem(0) and TRAIN_RULES["eval_every"].problem(0) is None
    assert task_rule("max_train_samples").problem(0) and task_rule("max_length").problem(-1)


def test_search_spaces_lie_inside_the_domains():
    """The tuning sweeper proposes values from each method's `search:` block: none may fail validation."""
    for method in METHODS:
        for key, spec in (yaml_defaults("method", method)[0].get("search") or {}).items():
            for value in spec.get("choices") or [spec["low"], spec["high"]]:
                assert method_rule(key).problem(value) is None, (method, key, value)


def test_task_limits_seed_and_flags(smoke_cfg):
    for key, value in (("max_train_samples", 0), ("max_eval_samples", -3), ("max_length", 0),
                       ("max_train_samples", "abc"), ("eval_subset_seed", -1)):
        assert_rejected(smoke_cfg, "task", key, value, names("lora"))
    for key, value in (("seed", "abc"), ("seed", -1), ("seed", 1.5), ("export", "yes"), ("precision", "fp64")):
        old = smoke_cfg[key]
        smoke_cfg[key] = value
        try:
            with pytest.raises(ConfigError, match=f"^{key}="):
                validate_config(smoke_cfg, names("lora"))
        finally:
            smoke_cfg[key] = old
    validate_config(compose_cfg(["model=tiny_bert", "train.max_grad_norm=null", "task.max_train_samples=null"]),
                    names("lora"))


def test_all_problems_in_one_line(smoke_cfg):
    cfg = compose_cfg(["model=tiny_bert", "+experiment=smoke", "train.max_steps=-5", "method.lr=nan", "method.r=0"])
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, names("lora"))
    message = str(info.value)
    assert "train.max_steps=-5" in message and "method.lr=nan" in message and "method.r=0" in message
    assert "rank r must be >= 1" in message and "method=lora" in message and "\n" not in message

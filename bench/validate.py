"""Validation of a composed config before anything loads: every numeric key in its domain.

`validate_config(cfg)` checks the top-level keys (seed, precision, flags), `train.*`, the task's numeric keys
(sample limits, max_length, seeds, ...) and the method's numeric keys (lr > 0, ranks >= 1, alpha > 0, dropout in
[0, 1), ratios in [0, 1], weights >= 0, ...; a numeric key no rule names must at least be finite). The rules
come from the key names and their YAML comments; a key whose YAML default is null may be set to null. A bad value
raises ConfigError with one line naming the key, the value, the domain and the fix (the YAML default).

bench.run.run() calls it first, before anything loads: a bad config leaves the cell's record `failed` with this
error (never a completed one, and nothing is trained); a seed that is not an integer, which the run id holds,
leaves no record at all. `python -m bench` prints the error as one line (bench/__main__.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """A bad configuration: a value out of its domain, or a method or task that rejected its configuration."""


@dataclass(frozen=True)
class Rule:
    """A numeric domain: integer or real, bounds (open or closed), and a name for the message."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    what: str = ""  # how the message names the key ("rank r"); empty: the key itself

    def domain(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "finite"
        return f"{text} (an integer)" if self.integer else text

    def problem(self, value: Any) -> str | None:
        """Why `value` is outside the domain, or None when it is inside."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not a number"
        if not math.isfinite(value):
            return "is not finite"
        if self.integer and not isinstance(value, int):
            return "is not an integer"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return "is out of range"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return "is out of range"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


FINITE = Rule()
POSITIVE = Rule(low=0, low_open=True)
NON_NEGATIVE = Rule(low=0)
COUNT = Rule(integer=True, low=1)  # steps, sizes, samples: at least one
COUNT0 = Rule(integer=True, low=0)  # 0 means "none" / "off"
UNIT = Rule(low=0, high=1)  # a fraction
UNIT_POSITIVE = Rule(low=0, high=1, low_open=True)
PROBABILITY = Rule(low=0, high=1, high_open=True)  # dropout, EMA coefficients
SEED = Rule(integer=True, low=0, high=2**32 - 1)  # numpy's seed range

TRAIN_RULES: dict[str, Rule] = {
    "max_steps": COUNT, "batch_size": COUNT, "grad_accum": COUNT, "warmup_ratio": UNIT, "weight_decay": NON_NEGATIVE,
    "max_grad_norm": POSITIVE, "eval_every": COUNT0, "eval_batch_size": COUNT, "log_every": COUNT,
    "calibration_batches": COUNT0, "checkpoint_every": COUNT0, "num_workers": COUNT0, "nproc": COUNT,
}
TRAIN_FLAGS = ("group_by_length", "eval_base")
TOP_FLAGS = ("force", "progress", "export")
RECORD_FLAGS = ("save_adapter", "save_delta")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: What a bad train.* value breaks, added to its message.
TRAIN_HINTS = {"max_steps": "a run of no steps trains nothing", "max_grad_norm": "null disables clipping"}

#: Method keys by exact name (the YAML comments say what each is), then by pattern; first match wins.
METHOD_RULES: dict[str, Rule] = {
    "alpha": POSITIVE, "dropout": PROBABILITY, "beta1": PROBABILITY, "beta2": PROBABILITY,
    # counts: components, experts, bases, blocks, samples, steps between events
    **{k: COUNT for k in ("k", "l", "n_blocks", "gamma", "top_h", "bits", "max_iterations", "deltaT",
                          "search_steps", "max_stages")},
    "levels": Rule(integer=True, low=2),  # CoDyRA: the values of linspace(0, κ, levels), 0 first
    "compress_ratio": Rule(low=1, low_open=True),  # PELA: the compact layer keeps 1/c of the entries
    "distill_steps": COUNT0, "norm_eps": NON_NEGATIVE,  # PELA: 0 steps keeps the SVD factors as they are
    **{k: COUNT0 for k in ("init_warmup", "compensation_steps", "svd_oversampling", "rank_min_dim",
                           "projection_prng_key")},
    # fractions
    **{k: UNIT for k in ("ratio", "min_ratio", "tau", "sparsity")},
    **{k: UNIT_POSITIVE for k in ("density", "keep_ratio", "freeze_eta")},
    # strictly positive scales: they divide, or a zero freezes the adapter
    **{k: POSITIVE for k in ("eta", "stable_gamma", "delta", "eig_floor", "init_std", "scale", "outlier_threshold",
                             "bit_budget", "align_norm", "epsilon")},
    # weights of loss terms, thresholds, perturbation strengths, lr multipliers: zero switches them off
    **{k: NON_NEGATIVE for k in ("sigma", "beta", "threshold", "max_threshold", "reserve_e", "bias_update_rate",
                                 "inactive_lr_scale", "weight_decay")},
}
METHOD_PATTERNS: tuple[tuple[str, Rule], ...] = (
    (r"(^|_)lr$", POSITIVE),  # lr, gate_lr, arch_lr, compensation_lr
    (r"(_weight|_decay)$|^lambda", NON_NEGATIVE),  # loss-term weights (lambda_rank is a weight, not a rank)
    (r"^r$|^r_|_r$|(^|_)rank(_|$)|_rank_", Rule(integer=True, low=1, what="rank {key}")),  # r, r_lora, init_r, ...
    (r"_samples$", COUNT),
    (r"(_steps|_every|_interval|_gap)$|^interval_steps$", COUNT),
    (r"block_size$", COUNT),
    (r"_ratio$", UNIT),
    (r"_seed$|_prng_key$", COUNT0),
)
TASK_RULES: dict[str, Rule] = {"max_length": COUNT, "num_labels": Rule(integer=True, low=1),
                               # a merge (tasks/merge.py): λ, the fraction of entries kept, LoRA-LEGO's k
                               "scale": POSITIVE, "density": UNIT_POSITIVE, "clusters": COUNT,
                               # distribution shift (tasks/shift.py): α-BN's source weight, LAME's neighbours
                               "alpha": UNIT, "lame_knn": COUNT}
TASK_PATTERNS: tuple[tuple[str, Rule], ...] = (
    (r"^max_(train|eval)_samples$", COUNT),  # null: all rows
    (r"_seed$", COUNT0),
    (r"^probe_samples$|^num_class_images$", COUNT0),  # 0: off
    (r"^(max_|num_)|_(length|chunk|samples|steps|per_prompt)$", COUNT),
    (r"_weight$", NON_NEGATIVE),
)


def rule_for(key: str, table: dict[str, Rule], patterns: tuple[tuple[str, Rule], ...]) -> Rule:
    """The rule of a key: by exact name, else the first matching pattern, else FINITE."""
    if key in table:
        return table[key]
    for pattern, rule in patterns:
        if re.search(pattern, key):
            return rule
    return FINITE


def method_rule(key: str) -> Rule:
    return rule_for(key, METHOD_RULES, METHOD_PATTERNS)


def task_rule(key: str) -> Rule:
    return rule_for(key, TASK_RULES, TASK_PATTERNS)


@cache
def _yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:  # OmegaConf's YAML loader: `5e-6` is a float (PyYAML's YAML 1.1 reads a string); interpolations stay text
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001  (a missing or unparsable file: no defaults to quote)
        return {}
    return raw if isinstance(raw, dict) else {}


def yaml_defaults(group: str, option: str) -> tuple[dict[str, Any], str]:
    """The raw keys of conf/<group>/<option>.yaml (a `# @package _global_` file's task: block; a GLUE subtask's
    defaults file merged under it) and where they come from, for the fix in a message."""
    path = CONF / group / f"{option}.yaml"
    while not path.is_file() and "/" in option:  # a cell named past its option (merge/glue/ties, peft/lora/x)
        option = option.rsplit("/", 1)[0]
        path = CONF / group / f"{option}.yaml"
    raw = _yaml(path)
    keys = dict(raw.get(group, raw)) if isinstance(raw.get(group, raw), dict) else {}
    # the option's own defaults list: method/dora.yaml `[lora, _self_]`, glue/sst2.yaml `[glue/_common@_here_, _self_]`
    for entry in raw.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_" and (CONF / group / f"{entry.split('@')[0]}.yaml").is_file():
            keys = {**yaml_defaults(group, entry.split("@")[0])[0], **keys}
    keys.pop("defaults", None)
    return keys, f"of {group}={option} in conf/{group}/{option}.yaml"


def _fix(key: str, default: Any, where: str, rule: Rule, nullable: bool) -> str:
    if default is not None and rule.problem(default) is None:
        return f"set {key}={_show(default)} (the default {where})"
    if nullable:
        return f"set {key}=null (the default {where}) or a value {rule.domain()}"
    return f"set {key} to a value {rule.domain()}"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def check_value(key: str, value: Any, rule: Rule, default: Any, where: str, nullable: bool,
                hint: str = "") -> str | None:
    """One line naming the key, the value and the fix, or None when the value is valid."""
    if value is None and nullable:
        return None
    why = "is null" if value is None else rule.problem(value)
    if why is None:
        return None
    name = rule.what.format(key=key.rsplit(".", 1)[-1]) if rule.what else key.rsplit(".", 1)[-1]
    hint = f"; {hint}" if hint else ""
    return (f"{key}={_show(value)} {why}: {name} must be {rule.domain()}{hint}; "
            f"{_fix(key, default, where, rule, nullable)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_key(key: str, value: Any, defaults: dict[str, Any], rule: Rule) -> bool:
    """Whether a task or method key is numeric: its YAML default is a number, or null under a numeric rule (gate_lr,
    max_train_samples), or the key is not in the YAML and its value is a number."""
    if key not in defaults:
        return _is_number(value)
    default = defaults[key]
    if default is None:
        return rule is not FINITE or _is_number(value)
    return _is_number(default)


def config_problems(cfg: Any, names: dict[str, str]) -> list[str]:
    """Every problem of the composed config `cfg` (a DictConfig or a plain dict), one line each."""
    from omegaconf import DictConfig, OmegaConf

    plain = cfg
    if isinstance(cfg, DictConfig):
        plain = {k: (OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k])
                 for k in cfg if k != "hydra"}
    problems: list[str] = []
    base = _yaml(CONF / "config.yaml")

    # ---------------------------------------------------------------- top level
    seed = plain.get("seed")
    if (p := check_value("seed", seed, SEED, base.get("seed"), "in conf/config.yaml", False)) is not None:
        problems.append(p)
    if "precision" in plain and plain["precision"] not in PRECISIONS:
        problems.append(f"precision={_show(plain['precision'])} is not one of {', '.join(PRECISIONS)}; "
                        f"set precision=auto (the default in conf/config.yaml)")
    flags = [(k, plain.get(k), base.get(k)) for k in TOP_FLAGS if k in plain]
    flags += [(f"train.{k}", (plain.get("train") or {}).get(k), (base.get("train") or {}).get(k))
              for k in TRAIN_FLAGS if k in (plain.get("train") or {})]
    flags += [(f"record.{k}", (plain.get("record") or {}).get(k), (base.get("record") or {}).get(k))
              for k in RECORD_FLAGS if k in (plain.get("record") or {})]
    for key, value, default in flags:
        if not isinstance(value, bool):
            problems.append(f"{key}={_show(value)} is not a boolean: {key.rsplit('.', 1)[-1]} must be true or "
                            f"false; set {key}={_show(default if isinstance(default, bool) else False)}")

    # ---------------------------------------------------------------- train.*
    train, train_defaults = plain.get("train") or {}, base.get("train") or {}
    for key, rule in TRAIN_RULES.items():
        if key not in train:
            continue
        default = train_defaults.get(key)
        nullable = default is None or key == "max_grad_norm"
        p = check_value(f"train.{key}", train[key], rule, default, "in conf/config.yaml", nullable,
                        TRAIN_HINTS.get(key, ""))
        if p is not None:
            problems.append(p)

    from bench.train import SCHEDULES

    if train.get("lr_schedule", "linear") not in SCHEDULES:
        problems.append(f"train.lr_schedule={_show(train['lr_schedule'])} is not a schedule: choose one of "
                        f"{', '.join(sorted(SCHEDULES))}; set train.lr_schedule=linear (the default)")
    nproc, batch = train.get("nproc", 1), train.get("batch_size", 1)
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (nproc, batch)):  # else named above
        from bench.distributed import check  # a multi-process cell (bench/distributed.py)

        p = check(str(train.get("strategy", "single")), nproc, batch)
        if p is not None:
            problems.append(p)

    # ---------------------------------------------------------------- protocol.*
    protocol = plain.get("protocol") or {}
    if protocol.get("task") and names.get("task") and names["task"] != protocol["task"]:
        problems.append(f"protocol={protocol.get('name')} is the setting of task={protocol['task']}, and this run is "
                        f"task={names['task']}: add task={protocol['task']}, or choose another protocol")

    # ---------------------------------------------------------------- task.* and method.*
    for group, rule_of in (("task", task_rule), ("method", method_rule)):
        node = plain.get(group) or {}
        if not isinstance(node, dict):
            continue
        defaults, where = yaml_defaults(group, names.get(group, ""))
        for key, value in node.items():
            if key.startswith("_") or key == "search" or not _numeric_key(key, value, defaults, rule_of(key)):
                continue
            nullable = key in defaults and defaults[key] is None
            p = check_value(f"{group}.{key}", value, rule_of(key), defaults.get(key), where, nullable)
            if p is not None:
                problems.append(p)
    return problems


def validate_config(cfg: Any, names: dict[str, str] | None = None) -> None:
    """Raise ConfigError (one line, every problem) when a key of the composed config is outside its domain.

    `names` are the cell's option names ({"method": "lora", "task": "glue/sst2", ...}); by default Hydra's choices.
    """
    if names is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            choices = HydraConfig.get().runtime.choices
            names = {g: str(choices[g]) for g in ("method", "task", "model") if g in choices}
        except (ValueError, KeyError, AttributeError):
            names = {}
    problems = config_problems(cfg, names)
    if problems:
        raise ConfigError("; ".join(problems))

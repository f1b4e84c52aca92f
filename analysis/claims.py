"""Paper claims as declarative checks: each method paper's headline result, tested on the records of a grid.

    python -m analysis claims [--results-root .] [--out results/claims]   # claims.{md,csv} and figures/

One YAML per claim in conf/claim/ (the option name is the file name). Each is a `# @package _global_` config that
`python -m bench +claim=<name> -m` runs as a grid (its `hydra.sweeper.params`, its `results_dir`, whatever overrides
the experiment needs), plus a `claim:` node that this module reads and Hydra ignores::

    claim:
      paper: "2404.02948"          # arXiv id
      method: pissa                # conf/method/<name>.yaml
      reference: lora              # the method it is compared against
      statement: ...               # what the paper claims (one sentence)
      setting: ...                 # what this small-scale check runs
      quantity: metric             # what is compared (below)
      rule: better                 # the decision rule (below); `all` with a `rules:` list combines rules
      figure: curves               # bars | curves | ranks | memory | params | recovery | intruders

Quantities, per record (one record per seed; tuning-trial records are left out):

- ``metric``: the task's main metric; ``metrics.<name>``: any metric the record holds, ``{metric}`` standing for the
  main metric's name (``metrics.{metric}@r=1``: DyLoRA's score at inference rank 1);
- ``params.<key>`` (``params.trainable``) and ``cost.<key>`` (``cost.optimizer_state_bytes``), deterministic given the
  config (one record per side suffices);
- ``curve_area``: the mean training loss over the logged curve (up to step ``until`` when given); ``curve_loss``: the
  logged loss nearest step ``step``; both lower-is-better;
- ``recovery`` (rule ``recovers``): (compensated − compressed) / (base − compressed) of a compression method's
  record, from its main metric and ``base/<metric>``, ``compressed/<metric>``;
- ``intruders``: total intruder dimensions of a run at ``eps``, read from the CSV that ``python -m analysis intruders``
  writes (``<results_dir>/analysis/intruders_total.csv``), not from the records.

Rules (``level`` 0.95 unless given; "the interval" is Welch's interval of the difference of means over seeds
(analysis.stats.welch), a paired t-interval when both sides are the same method's records, a one-sample t-interval
against a constant ``reference_value``, and the exact difference for deterministic quantities):

- ``better``: the method's mean is better than the reference's (in the quantity's direction) and the interval of
  the difference excludes 0. Not reproduced when the interval lies wholly on the wrong side (≤ 0);
- ``not_worse``: the interval's bad end stays within ``margin`` (in the quantity's units) of 0. Not reproduced when
  the whole interval is worse than −margin;
- ``less``: the method's quantity ≤ ``factor`` × the reference's (literally smaller: parameters, bytes, intruders).
  Not reproduced when the interval of method − factor × reference lies above 0;
- ``within``: reference / ``factor`` ≤ method ≤ ``factor`` × reference (two one-sided ``less`` checks);
- ``recovers``: the recovery's t-interval over seeds lies at or above ``fraction``; not reproduced when it lies below;
  inconclusive when compression cost less than ``min_drop`` (nothing to recover);
- ``all``: every rule in ``rules`` (each inherits the claim's keys it does not set).

Every rule is checked on each task of the claim's grid, and the claim's verdict is their conjunction: ``reproduced``
when every check holds, ``not reproduced`` when one check establishes the opposite, ``inconclusive`` otherwise (an
interval that straddles, one seed, missing records — the reason names what is missing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy import stats as sps

from matplotlib.lines import Line2D

from analysis import plots
from analysis.records import is_reported, latest_per_cell, load_records
from analysis.stats import welch

REPO = Path(__file__).resolve().parents[1]
CLAIM_DIR = REPO / "conf" / "claim"
METHOD_DIR = REPO / "conf" / "method"
DEFAULT_OUT = Path("results") / "claims"
INTRUDERS_CSV = Path("analysis") / "intruders_total.csv"
#: figures/<this>: the digest of each figure's inputs (an unchanged figure is not redrawn).
DIGESTS = "digests.json"

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"

RULES = ("better", "not_worse", "less", "within", "recovers", "all")
FIGURE_KINDS = ("bars", "curves", "ranks", "memory", "params", "recovery", "intruders")
PAPER_ID = re.compile(r"^\d{4}\.\d{4,5}(v\d+)?$")
QUANTITY = re.compile(r"^(metric|metrics\..+|params\.\w+|cost\.\w+|curve_area|curve_loss|recovery|intruders)$")
#: Quantities fixed by the config (not by the seed): one record per side decides them exactly.
DETERMINISTIC = re.compile(r"^(params\.\w+|cost\.optimizer_state_bytes)$")
#: Keys of a claim (or a rule inside `all`) that a sub-rule inherits unless it sets its own.
INHERITED = ("method", "reference", "quantity", "reference_quantity", "until", "step", "eps", "margin", "factor",
             "fraction", "min_drop", "level", "select", "method_select", "reference_select", "reference_value",
             "higher_is_better", "deterministic")
#: Keys of the claim file that are not run overrides (left out of the record filters).
NOT_OVERRIDES = ("claim", "hydra", "defaults", "results_dir", "force", "progress", "export", "tracker", "record")
CSV_COLUMNS = ["claim", "paper", "method", "reference", "setting", "task", "rule", "quantity", "n_method",
               "n_reference", "value", "value_low", "value_high", "reference_value", "statistic", "stat",
               "stat_low", "stat_high", "threshold", "check_verdict", "reason", "verdict", "figure"]


class ClaimError(ValueError):
    """A claim file is malformed (missing keys, an unknown rule or quantity)."""


# ---------------------------------------------------------------------------------------------- claims


@dataclass
class Claim:
    """One conf/claim/<name>.yaml: its `claim:` node and what its grid selects."""

    name: str
    path: Path
    spec: dict[str, Any]
    results_dir: str
    grid: dict[str, list[str]]  # swept keys -> values (hydra.sweeper.params)
    fixed: dict[str, Any]  # dotted run overrides the file sets (plain values only)
    protocol: str  # the protocol the grid runs under (`override /protocol: X`; "none" otherwise)

    @property
    def paper(self) -> str:
        return str(self.spec.get("paper", ""))

    @property
    def method(self) -> str:
        return str(self.spec.get("method", ""))

    @property
    def reference(self) -> str:
        return str(self.spec.get("reference", ""))

    @property
    def rule(self) -> str:
        return str(self.spec.get("rule", ""))

    @property
    def statement(self) -> str:
        return str(self.spec.get("statement", "")).strip()

    @property
    def setting(self) -> str:
        return str(self.spec.get("setting", "")).strip()

    @property
    def tasks(self) -> list[str]:
        tasks = self.spec.get("tasks") or self.grid.get("task") or []
        return [str(t) for t in ([tasks] if isinstance(tasks, str) else tasks)]

    @property
    def models(self) -> list[str]:
        return self.grid.get("model", [])

    @property
    def figure(self) -> str:
        if self.spec.get("figure"):
            return str(self.spec["figure"])
        quantities = {leaf["quantity"] for leaf in leaves(self.spec)}
        if "intruders" in quantities:
            return "intruders"
        if "recovery" in quantities:
            return "recovery"
        if quantities & {"curve_area", "curve_loss"}:
            return "curves"
        return "bars"

    @property
    def rule_text(self) -> str:
        return rule_text(self.spec)

    @property
    def quantity_text(self) -> str:
        return "; ".join(dict.fromkeys(quantity_text(leaf) for leaf in leaves(self.spec)))

    @property
    def run_command(self) -> str:
        return f"python -m bench +claim={self.name} -m"


def _grid_values(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys of a plain mapping; interpolations (``${...}``) are left out (they depend on the cell)."""
    out: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif not (isinstance(node, str) and "${" in node):
        out[prefix[:-1]] = node
    return out


def load_claim(path: Path) -> Claim:
    """Read one claim file (OmegaConf.load, nothing resolved)."""
    path = Path(path)
    raw = OmegaConf.load(path)
    if "claim" not in raw or not isinstance(raw.get("claim"), Mapping):
        raise ClaimError(f"{path}: no `claim:` node")
    plain = OmegaConf.to_container(raw, resolve=False)
    spec = plain["claim"]
    params = ((plain.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    grid = {str(k): _grid_values(v) for k, v in params.items()}
    protocol = "none"
    for entry in plain.get("defaults") or []:
        if isinstance(entry, Mapping):
            for key, value in entry.items():
                group = str(key).replace("override", "").strip().lstrip("/")
                if group == "protocol":
                    protocol = str(value)
                elif group in ("task", "model", "method") and group not in grid:
                    grid[group] = [str(value)]
    fixed = _flatten({k: v for k, v in plain.items() if k not in NOT_OVERRIDES})
    return Claim(path.stem, path, spec, str(plain.get("results_dir", "results")), grid, fixed, protocol)


def load_claims(conf_dir: Path = CLAIM_DIR) -> list[Claim]:
    """Every conf/claim/*.yaml, by name."""
    return [load_claim(p) for p in sorted(Path(conf_dir).glob("*.yaml"))]


def leaves(spec: Mapping[str, Any], inherited: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The simple rules of a claim (the members of `all`, recursively), each with the keys it inherits."""
    base = {k: v for k, v in (inherited or {}).items()}
    base.update({k: spec[k] for k in INHERITED if k in spec})
    if spec.get("rule") == "all":
        out = []
        for sub in spec.get("rules") or []:
            out.extend(leaves(sub if isinstance(sub, Mapping) else {}, base))
        return out
    leaf = dict(base, rule=spec.get("rule"))
    if leaf.get("rule") == "recovers":
        leaf["quantity"] = "recovery"  # the rule defines its quantity
    leaf.setdefault("quantity", "metric")
    return [leaf]


def known_methods(method_dir: Path = METHOD_DIR) -> set[str]:
    return {p.stem for p in Path(method_dir).glob("*.yaml")}


def claim_problems(claim: Claim, methods: set[str] | None = None) -> list[str]:
    """What is wrong with a claim file (empty when nothing is)."""
    methods = known_methods() if methods is None else methods
    spec, problems = claim.spec, []
    if not PAPER_ID.match(claim.paper):
        problems.append(f"paper {claim.paper!r} is not an arXiv id (e.g. 2106.09685)")
    for key in ("method", "reference", "statement", "setting", "rule"):
        if not str(spec.get(key, "")).strip():
            problems.append(f"claim.{key} is missing")
    if claim.method not in methods:
        problems.append(f"method {claim.method!r} is not in conf/method")
    if spec.get("rule") not in RULES:
        problems.append(f"rule {spec.get('rule')!r} is not one of {', '.join(RULES)}")
    if spec.get("rule") == "all" and not spec.get("rules"):
        problems.append("rule all needs a non-empty rules: list")
    if "quantity" not in spec and spec.get("rule") != "recovers":
        problems.append("claim.quantity is missing")
    if claim.figure not in FIGURE_KINDS:
        problems.append(f"figure {claim.figure!r} is not one of {', '.join(FIGURE_KINDS)}")
    if not claim.tasks:
        problems.append("no task: sweep `task` in hydra.sweeper.params or set claim.tasks")
    for leaf in leaves(spec) if spec.get("rule") in RULES else []:
        rule, quantity = leaf.get("rule"), str(leaf.get("quantity"))
        if rule not in RULES or rule == "all":
            problems.append(f"rule {rule!r} inside `all` is not one of {', '.join(RULES[:-1])}")
            continue
        for q in (quantity, leaf.get("reference_quantity")):
            if q is not None and not QUANTITY.match(str(q)):
                problems.append(f"quantity {q!r} is not a known kind (metric, metrics.<name>, params.<key>, "
                                f"cost.<key>, curve_area, curve_loss, recovery, intruders)")
        needed = {"not_worse": "margin", "less": "factor", "within": "factor", "recovers": "fraction"}.get(rule)
        if needed and not isinstance(leaf.get(needed), (int, float)):
            problems.append(f"rule {rule} needs a numeric {needed}")
        ref = leaf.get("reference")
        if "reference_value" not in leaf and ref not in methods:
            problems.append(f"reference {ref!r} is not in conf/method (or give a reference_value)")
        if quantity == "curve_loss" and not isinstance(leaf.get("step"), int):
            problems.append("quantity curve_loss needs an integer step")
    return problems


def rule_text(spec: Mapping[str, Any]) -> str:
    """``better(metric)``, ``not_worse(metric, margin 0.02)``, ``all[...]`` of the simple rules."""
    texts = []
    for leaf in leaves(spec):
        rule = str(leaf.get("rule"))
        arg = {"not_worse": "margin", "less": "factor", "within": "factor", "recovers": "fraction"}.get(rule)
        parts = [str(leaf.get("quantity"))]
        if arg and isinstance(leaf.get(arg), (int, float)):
            parts.append(f"{arg} {leaf[arg]:g}")
        texts.append(f"{rule}({', '.join(parts)})")
    return texts[0] if spec.get("rule") != "all" and len(texts) == 1 else "all[" + ", ".join(texts) + "]"


def quantity_text(leaf: Mapping[str, Any]) -> str:
    q = str(leaf.get("quantity"))
    if q == "curve_area":
        return f"curve_area (mean training loss, steps ≤ {leaf['until']})" if leaf.get("until") else \
            "curve_area (mean training loss over the curve)"
    if q == "curve_loss":
        return f"curve_loss (training loss at step {leaf.get('step')})"
    if q == "intruders":
        return f"intruders (total at ε = {leaf.get('eps', 0.5):g}, from intruders_total.csv)"
    if q == "recovery":
        return "recovery = (compensated − compressed) / (base − compressed)"
    ref = leaf.get("reference_quantity")
    return f"{q} vs {ref}" if ref and ref != q else q


# ---------------------------------------------------------------------------------------------- records


def _get(mapping: Any, dotted: str) -> Any:
    node = mapping
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return str(a) == str(b)


def _finished(record: Mapping[str, Any]) -> str:
    stamps = record.get("timestamps") or {}
    return str(stamps.get("finished") or stamps.get("started") or "")


@dataclass
class Side:
    """One side of a comparison: a method's records (filtered by `select`) and the quantity read from them."""

    method: str
    quantity: str
    select: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(self.select.items()))
        return method_label(self.method) + (f" {extra}" if extra else "")


#: Labels analysis.plots does not know (its `hydra` is this suite's `hydra_lora`).
LABELS = {"hydra_lora": "Hydra", "lora_ga_peft": "LoRA-GA (PEFT)"}


def method_label(method: str) -> str:
    return LABELS.get(method) or plots.method_label(method)


class RecordPool:
    """Records of the results directories claims read, loaded once each (trial records left out)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._csv: dict[str, pd.DataFrame | None] = {}

    def records(self, results_dir: str) -> list[dict[str, Any]]:
        if results_dir not in self._records:
            directory = self.root / results_dir
            found = load_records(directory) if (directory / "runs").is_dir() else []
            reported = [r for r in found if is_reported(r)]
            self._records[results_dir] = [dict(r) for r in latest_per_cell(reported)]
        return self._records[results_dir]

    def intruders(self, results_dir: str, source: str | None) -> pd.DataFrame | None:
        key = f"{results_dir}::{source}"
        if key not in self._csv:
            path = self.root / results_dir / (source or INTRUDERS_CSV)
            self._csv[key] = pd.read_csv(path) if path.is_file() else None
        return self._csv[key]

    def intruders_path(self, results_dir: str, source: str | None) -> Path:
        return self.root / results_dir / (source or INTRUDERS_CSV)


def select_records(records: Iterable[Mapping[str, Any]], claim: Claim, method: str, task: str,
                   select: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Completed reported records of `method` on `task` in the claim's grid (protocol, model, the file's overrides,
    swept values) that match `select`, one per seed (the latest)."""
    by_seed: dict[Any, Mapping[str, Any]] = {}
    for r in records:
        if r.get("status") != "completed" or r.get("method") != method or r.get("task") != task:
            continue
        if claim.models and r.get("model") not in claim.models:
            continue
        if ((r.get("tuning") or {}).get("protocol") or "none") != claim.protocol:
            continue
        config = r.get("config") or {}
        if not _matches(config, claim, select):
            continue
        seed = r.get("seed")
        if seed not in by_seed or _finished(r) > _finished(by_seed[seed]):
            by_seed[seed] = r
    return [by_seed[s] for s in sorted(by_seed, key=lambda s: (s is None, s))]


def _matches(config: Mapping[str, Any], claim: Claim, select: Mapping[str, Any]) -> bool:
    for key, value in claim.fixed.items():  # the overrides the claim file sets (where the record has the key)
        have = _get(config, key)
        if have is not _MISSING and not _same(have, value):
            return False
    for key, values in claim.grid.items():  # swept keys other than the cell's names
        if key in ("method", "task", "model", "seed") or "." not in key:
            continue
        have = _get(config, key)
        if have is not _MISSING and not any(_same(have, _literal(v)) for v in values):
            return False
    for key, value in select.items():  # the side's own filter: the record must have the key
        have = _get(config, key)
        if have is _MISSING or not _same(have, value):
            return False
    return True


def _literal(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def record_value(record: Mapping[str, Any], quantity: str, leaf: Mapping[str, Any]) -> float:
    """The quantity of one record (NaN when it does not hold it)."""
    main = str(record.get("main_metric") or "")
    metrics = record.get("metrics") or {}

    def number(x: Any) -> float:
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan

    if quantity == "metric":
        return number(metrics.get(main))
    if quantity.startswith("metrics."):
        return number(metrics.get(quantity[len("metrics."):].replace("{metric}", main)))
    if quantity.startswith("params."):
        return number((record.get("params") or {}).get(quantity[len("params."):]))
    if quantity.startswith("cost."):
        return number((record.get("cost") or {}).get(quantity[len("cost."):]))
    if quantity in ("curve_area", "curve_loss"):
        points = [(number(e.get("step")), number(e.get("loss"))) for e in record.get("curve") or []
                  if isinstance(e, Mapping)]
        points = [(s, v) for s, v in points if math.isfinite(s) and math.isfinite(v)]
        if not points:
            return math.nan
        if quantity == "curve_loss":
            step = float(leaf.get("step"))
            return min(points, key=lambda p: (abs(p[0] - step), p[0]))[1]
        until = leaf.get("until")
        kept = [v for s, v in points if until is None or s <= float(until)]
        return float(np.mean(kept)) if kept else math.nan
    if quantity == "recovery":
        base, comp = number(metrics.get(f"base/{main}")), number(metrics.get(f"compressed/{main}"))
        final = number(metrics.get(main))
        return (final - comp) / (base - comp) if base != comp else math.nan
    if quantity == "compression_drop":
        return number(metrics.get(f"base/{main}")) - number(metrics.get(f"compressed/{main}"))
    raise ClaimError(f"unknown quantity {quantity!r}")


def higher_is_better(quantity: str, leaf: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> bool:
    if isinstance(leaf.get("higher_is_better"), bool):
        return leaf["higher_is_better"]
    if quantity in ("curve_area", "curve_loss", "intruders") or quantity.startswith(("params.", "cost.")):
        return False
    if quantity in ("metric", "recovery"):
        for r in records:
            main = r.get("main_metric")
            if main in (r.get("higher_is_better") or {}):
                return bool(r["higher_is_better"][main])
        return True
    name = quantity[len("metrics."):]
    for r in records:
        directions = r.get("higher_is_better") or {}
        resolved = name.replace("{metric}", str(r.get("main_metric")))
        if resolved in directions:
            return bool(directions[resolved])
        base = resolved.split("@")[0].split("/")[-1]
        if base in directions:
            return bool(directions[base])
    return True


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class Interval:
    """Mean(a) − scale·mean(b) (or − scale·c) with its interval; `reason` says why there is no interval."""

    diff: float
    low: float
    high: float
    exact: bool = False
    reason: str | None = None


def _t_interval(x: np.ndarray, level: float) -> tuple[float, float, float]:
    mean = float(np.mean(x))
    if x.size < 2:
        return mean, math.nan, math.nan
    if np.ptp(x) == 0:
        return mean, mean, mean
    half = float(sps.t.ppf(0.5 + level / 2, x.size - 1) * np.std(x, ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def difference(a: Sequence[float], b: Sequence[float] | None, *, constant: float | None = None, scale: float = 1.0,
               deterministic: bool = False, paired: Sequence[tuple[float, float]] | None = None,
               level: float = 0.95) -> Interval:
    """The interval of mean(a) − scale·mean(b): exact for deterministic sides, paired t over seeds, one-sample t
    against a constant, Welch otherwise."""
    x = np.asarray([v for v in a if math.isfinite(v)], float)
    y = np.asarray([v for v in (b if b is not None else []) if math.isfinite(v)], float)
    if x.size == 0 or (constant is None and y.size == 0):
        return Interval(math.nan, math.nan, math.nan, reason="no value")
    ref = float(constant) if constant is not None else None
    if deterministic and np.ptp(x) == 0 and (ref is not None or np.ptp(y) == 0):
        d = float(x[0] - scale * (ref if ref is not None else y[0]))
        return Interval(d, d, d, exact=True)
    if paired is not None and constant is None:
        z = np.asarray([p - scale * q for p, q in paired if math.isfinite(p) and math.isfinite(q)], float)
        if z.size < 2:
            return Interval(float(np.mean(z)) if z.size else math.nan, math.nan, math.nan,
                            reason=f"{z.size} paired seed{'s' if z.size != 1 else ''} (an interval needs 2)")
        mean, lo, hi = _t_interval(z, level)
        return Interval(mean, lo, hi, exact=bool(np.ptp(z) == 0))
    if ref is not None:
        mean, lo, hi = _t_interval(x - scale * ref, level)
        if x.size < 2:
            return Interval(mean, lo, hi, reason="1 seed (an interval needs 2)")
        return Interval(mean, lo, hi, exact=bool(np.ptp(x) == 0))
    comp = welch(x, scale * y, level)
    if x.size < 2 or y.size < 2:
        few = [f"{n} seed{'s' if n != 1 else ''} of the {side}" for n, side in ((x.size, "method"),
                                                                                 (y.size, "reference")) if n < 2]
        return Interval(comp.diff, math.nan, math.nan, reason=f"{' and '.join(few)} (an interval needs 2 each)")
    if math.isnan(comp.ci_low):  # both sides constant and equal: the difference is exactly 0
        return Interval(0.0, 0.0, 0.0, exact=True)
    return Interval(comp.diff, comp.ci_low, comp.ci_high, exact=comp.ci_low == comp.ci_high)


# ---------------------------------------------------------------------------------------------- checks


@dataclass
class Check:
    """One simple rule on one task: the measured values, the statistic, and the verdict."""

    task: str
    rule: str
    quantity: str
    method: str
    reference: str
    n_method: int = 0
    n_reference: int = 0
    value: float = math.nan
    value_low: float = math.nan
    value_high: float = math.nan
    reference_value: float = math.nan
    statistic: str = ""
    stat: float = math.nan
    stat_low: float = math.nan
    stat_high: float = math.nan
    threshold: str = ""
    verdict: str = INCONCLUSIVE
    reason: str = ""
    main_metric: str = ""
    margin: float = 0.0


def _decide(low: float, high: float, good: float, bad: float) -> str:
    """Reproduced when the whole interval is beyond `good` (low > good), not when it is at or below `bad`."""
    if low > good:
        return REPRODUCED
    if high <= bad:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def evaluate_rule(leaf: Mapping[str, Any], a: Sequence[float], b: Sequence[float] | None, *,
                  constant: float | None = None, higher: bool = True, deterministic: bool = False,
                  paired: Sequence[tuple[float, float]] | None = None, drop: Sequence[float] | None = None,
                  check: Check | None = None) -> Check:
    """Apply one simple rule to the method's values `a` and the reference's `b` (or a constant)."""
    check = check or Check("", str(leaf.get("rule")), str(leaf.get("quantity")), "", "")
    rule, level = str(leaf.get("rule")), float(leaf.get("level", 0.95))
    xa = np.asarray([v for v in a if math.isfinite(v)], float)
    xb = np.asarray([v for v in (b if b is not None else []) if math.isfinite(v)], float)
    check.n_method, check.n_reference = int(xa.size), int(xb.size) if constant is None else 0
    if xa.size:
        check.value, check.value_low, check.value_high = _t_interval(xa, level)
        if deterministic and np.ptp(xa) == 0:
            check.value_low = check.value_high = check.value
    check.reference_value = float(constant) if constant is not None else (float(np.mean(xb)) if xb.size else math.nan)
    check.margin = float(leaf.get("margin", 0.0)) if rule == "not_worse" else 0.0
    if rule in ("less", "within"):
        factor = float(leaf["factor"])
        check.threshold = f"∈ [{1 / factor:.3g}, {factor:.3g}]×" if rule == "within" else f"≤ {factor:g}×"
    elif rule in ("better", "not_worse"):
        check.threshold = "> 0" if rule == "better" else f"> −{check.margin:g}"

    if rule == "recovers":
        return _recovers(leaf, xa, drop, level, check)
    if xa.size == 0 or (constant is None and xb.size == 0):
        check.verdict, check.reason = INCONCLUSIVE, check.reason or "no records"
        return check

    if rule in ("better", "not_worse"):
        iv = difference(xa, xb, constant=constant, deterministic=deterministic, paired=paired, level=level)
        sign = 1.0 if higher else -1.0
        d, lo, hi = sign * iv.diff, *sorted((sign * iv.low, sign * iv.high))
        check.statistic, check.stat, check.stat_low, check.stat_high = "improvement", d, lo, hi
        margin = check.margin
        if iv.reason:
            check.verdict, check.reason = INCONCLUSIVE, iv.reason
        elif rule == "better":
            check.verdict = _decide(lo, hi, 0.0, 0.0)
        else:
            check.verdict = _decide(lo, hi, -margin, -margin)
        if check.verdict == INCONCLUSIVE and not check.reason:
            check.reason = f"{_stat_text(check)} straddles {_threshold_text(check)[2:]}"
        return check

    if rule in ("less", "within"):
        factor = float(leaf["factor"])
        ref_mean = check.reference_value
        check.statistic = "ratio"
        check.stat = float(np.mean(xa)) / ref_mean if ref_mean else math.nan
        upper = difference(xa, xb, constant=constant, scale=factor, deterministic=deterministic, paired=paired,
                           level=level)
        parts = [("upper", upper, factor)]
        if rule == "within":
            parts.append(("lower", difference(xa, xb, constant=constant, scale=1.0 / factor,
                                              deterministic=deterministic, paired=paired, level=level), 1.0 / factor))
        if ref_mean:  # the ratio's interval, for display: the interval of method − reference, over the reference
            shown = difference(xa, xb, constant=constant, deterministic=deterministic, paired=paired, level=level)
            check.stat_low, check.stat_high = 1 + shown.low / ref_mean, 1 + shown.high / ref_mean
        verdicts, reasons = [], []
        for side, iv, scale in parts:
            if iv.reason:
                verdicts.append(INCONCLUSIVE)
                reasons.append(iv.reason)
                continue
            if iv.exact:
                holds = iv.diff <= 0 if side == "upper" else iv.diff >= 0
                verdicts.append(REPRODUCED if holds else NOT_REPRODUCED)
            elif side == "upper":  # method − factor·ref < 0 wanted
                verdicts.append(_decide(-iv.high, -iv.low, 0.0, 0.0))
            else:  # method − ref/factor > 0 wanted
                verdicts.append(_decide(iv.low, iv.high, 0.0, 0.0))
            if verdicts[-1] == INCONCLUSIVE:
                reasons.append(f"{_stat_text(check)} straddles {scale:.3g}×")
        check.verdict = combine(verdicts)
        check.reason = "; ".join(dict.fromkeys(reasons)) if check.verdict == INCONCLUSIVE else ""
        return check
    raise ClaimError(f"unknown rule {rule!r}")


def _recovers(leaf: Mapping[str, Any], xa: np.ndarray, drop: Sequence[float] | None, level: float,
              check: Check) -> Check:
    fraction, min_drop = float(leaf["fraction"]), float(leaf.get("min_drop", 0.01))
    check.statistic, check.threshold = "recovery", f"≥ {fraction:g}"
    check.stat, check.stat_low, check.stat_high = check.value, check.value_low, check.value_high
    drops = [d for d in (drop or []) if math.isfinite(d)]
    if xa.size == 0:
        check.verdict, check.reason = INCONCLUSIVE, check.reason or "no records with base/compressed scores"
        return check
    if drops and float(np.mean(drops)) < min_drop:
        check.verdict = INCONCLUSIVE
        cost = float(np.mean(drops))
        check.reason = f"compression cost only {cost:.3g} (< min_drop {min_drop:g}): nothing to recover"
        return check
    if xa.size < 2:
        check.verdict, check.reason = INCONCLUSIVE, "1 seed (an interval needs 2)"
        return check
    check.verdict = REPRODUCED if check.value_low >= fraction else (
        NOT_REPRODUCED if check.value_high < fraction else INCONCLUSIVE)
    if check.verdict == INCONCLUSIVE:
        check.reason = f"{_stat_text(check)} straddles {fraction:g}"
    return check


def combine(verdicts: Iterable[str]) -> str:
    """The conjunction: not reproduced if any is, reproduced if all are, else inconclusive."""
    verdicts = list(verdicts)
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return INCONCLUSIVE


# ---------------------------------------------------------------------------------------------- claims -> verdicts


@dataclass
class ClaimResult:
    claim: Claim
    checks: list[Check]
    verdict: str
    reason: str
    figures: list[Path] = field(default_factory=list)
    has_records: bool = False

    @property
    def verdict_text(self) -> str:
        return self.verdict if self.verdict != INCONCLUSIVE or not self.reason else f"{INCONCLUSIVE} ({self.reason})"


def _sides(leaf: Mapping[str, Any]) -> tuple[Side, Side | None, float | None]:
    common = dict(leaf.get("select") or {})
    method = Side(str(leaf["method"]), str(leaf["quantity"]), {**common, **(leaf.get("method_select") or {})})
    if "reference_value" in leaf:
        return method, None, float(leaf["reference_value"])
    quantity = str(leaf.get("reference_quantity") or leaf["quantity"])
    reference = Side(str(leaf["reference"]), quantity, {**common, **(leaf.get("reference_select") or {})})
    return method, reference, None


def _intruder_values(frame: pd.DataFrame | None, side: Side, task: str, claim: Claim, leaf: Mapping[str, Any]
                     ) -> dict[Any, float]:
    if frame is None:
        return {}
    eps = float(leaf.get("eps", 0.5))
    rows = frame[(frame["method"] == side.method) & (frame["task"] == task) & ((frame["eps"] - eps).abs() < 1e-9)]
    if claim.models and "model" in rows:
        rows = rows[rows["model"].isin(claim.models)]
    for key, value in side.select.items():
        column = key.split(".")[-1]
        if column not in rows:
            return {}
        rows = rows[pd.to_numeric(rows[column], errors="coerce") == float(value)] \
            if isinstance(value, (int, float)) else rows[rows[column].astype(str) == str(value)]
    rows = rows.drop_duplicates("id", keep="last")
    return {(row.seed, row.id): float(row.intruders) for row in rows.itertuples()}


def evaluate_claim(claim: Claim, pool: RecordPool) -> ClaimResult:
    """Every simple rule of the claim on every task of its grid, and their conjunction."""
    checks: list[Check] = []
    missing: dict[str, list[str]] = {}
    csv_missing = False
    method_records = False
    records = pool.records(claim.results_dir)
    for leaf in leaves(dict(claim.spec)):
        method_side, ref_side, constant = _sides(leaf)
        for task in claim.tasks:
            reference = ref_side.label if ref_side else f"{constant:g}"
            if leaf["rule"] == "recovers":
                reference = f"{method_side.label} compressed (the same runs)"
            check = Check(task, str(leaf["rule"]), quantity_text(leaf), method_side.label, reference)
            deterministic, paired, drop, main = False, None, None, ""
            if leaf["quantity"] == "intruders":
                frame = pool.intruders(claim.results_dir, leaf.get("source"))
                csv_missing |= frame is None
                a = list(_intruder_values(frame, method_side, task, claim, leaf).values())
                b = list(_intruder_values(frame, ref_side, task, claim, leaf).values()) if ref_side else []
                higher = False
                found = ((method_side, a), (ref_side, b))
            else:
                ra = select_records(records, claim, method_side.method, task, method_side.select)
                rb = select_records(records, claim, ref_side.method, task, ref_side.select) if ref_side else []
                a = [record_value(r, method_side.quantity, leaf) for r in ra]
                b = [record_value(r, ref_side.quantity, leaf) for r in rb] if ref_side else []
                higher = higher_is_better(method_side.quantity, leaf, ra + list(rb))
                deterministic = bool(leaf.get("deterministic", bool(DETERMINISTIC.match(method_side.quantity))))
                if ref_side and ref_side.method == method_side.method and ref_side.select == method_side.select:
                    by_seed = {r.get("seed"): r for r in rb}  # one method's own records: paired by seed
                    paired = [(record_value(r, method_side.quantity, leaf),
                               record_value(by_seed[r.get("seed")], ref_side.quantity, leaf))
                              for r in ra if r.get("seed") in by_seed]
                drop = [record_value(r, "compression_drop", leaf) for r in ra] if leaf["rule"] == "recovers" else None
                main = str((ra or rb or [{}])[0].get("main_metric") or "")
                found = ((method_side, ra), (ref_side, rb))
                for side, rs, values in ((method_side, ra, a), (ref_side, rb, b)):
                    if side is not None and rs and not any(math.isfinite(v) for v in values):
                        missing.setdefault(task, []).append(f"{side.label} without {side.quantity}")
            for side, rs in found:
                if side is not None and not rs:
                    missing.setdefault(task, []).append(side.label)
            method_records |= bool(found[0][1])
            if not a or (ref_side is not None and not b):
                check.reason = "no records" if not (a or b) else \
                    f"no records of {method_side.label if not a else ref_side.label}"
            check.main_metric = main
            checks.append(evaluate_rule(leaf, a, b, constant=constant, higher=higher, deterministic=deterministic,
                                        paired=paired, drop=drop, check=check))
    verdict = combine(c.verdict for c in checks)
    reason = ""
    if not method_records:
        verdict = INCONCLUSIVE
        if csv_missing:
            reason = (f"no intruders CSV: run {claim.run_command}, then python -m analysis intruders --results "
                      f"{claim.results_dir}")
        else:
            reason = f"no records: run {claim.run_command}"
    elif verdict == INCONCLUSIVE:
        parts = []
        if missing:
            gaps = ", ".join(f"{task} ({', '.join(dict.fromkeys(sides))})" for task, sides in missing.items())
            parts.append(f"missing records: {gaps}: run {claim.run_command}")
        parts += list(dict.fromkeys(
            f"{c.task} {check_label(c)}: {c.reason}" for c in checks
            if c.verdict == INCONCLUSIVE and c.reason and not c.reason.startswith("no records")))
        held = sorted({c.task for c in checks if c.verdict == REPRODUCED}
                      - {c.task for c in checks if c.verdict != REPRODUCED})
        if held:
            parts.append(f"holds on {', '.join(held)}")
        reason = "; ".join(parts)
    return ClaimResult(claim, checks, verdict, reason, has_records=method_records)


def check_label(check: Check) -> str:
    """``better(metric)``, ``less(params.trainable)``: which simple rule a check applies."""
    return f"{check.rule}({check.quantity.split(' ')[0]})"


def evaluate_claims(root: Path = Path("."), conf_dir: Path = CLAIM_DIR) -> list[ClaimResult]:
    pool = RecordPool(root)
    return [evaluate_claim(claim, pool) for claim in load_claims(conf_dir)]


# ---------------------------------------------------------------------------------------------- formatting


def format_value(quantity: str, value: float, main_metric: str = "") -> str:
    """A value in the quantity's natural unit: scores ×100, parameter counts (339K), bytes (MB), losses, ratios."""
    if value is None or not math.isfinite(value):
        return "—"
    q = quantity.split(" ")[0]
    if q == "metric" or (q.startswith("metrics.") and ("{metric}" in q or (main_metric and main_metric in q))):
        return f"{100 * value:.1f}"
    if q.startswith("params."):
        return _count(value)
    if q.startswith("cost.") and q.endswith("bytes"):
        return f"{value / 1e6:.3g} MB"
    if q.startswith("cost.") and q.endswith("_s"):
        return f"{value:.3g} s"
    if q in ("intruders",):
        return f"{value:.3g}"
    return f"{value:.3g}"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        rounded = float(f"{n / scale:.3g}")
        if abs(rounded) >= 1:
            return f"{rounded:g}{unit}"
    return f"{n:.3g}"


def _interval_text(quantity: str, value: float, low: float, high: float, main: str) -> str:
    text = format_value(quantity, value, main)
    if math.isfinite(low) and math.isfinite(high) and (low != value or high != value):
        text += f" [{format_value(quantity, low, main)}, {format_value(quantity, high, main)}]"
    return text


def _stat_text(check: Check) -> str:
    if not math.isfinite(check.stat):
        return "—"
    if check.statistic == "ratio":
        text = f"{check.stat:.3g}×"
        if math.isfinite(check.stat_low) and math.isfinite(check.stat_high) and check.stat_low != check.stat_high:
            text += f" [{check.stat_low:.3g}, {check.stat_high:.3g}]"
        return text
    if check.statistic == "recovery":
        return _interval_text("ratio", check.stat, check.stat_low, check.stat_high, "")
    # an improvement: the difference in the quantity's units (scores ×100), signed so that > 0 is better
    scale = 100.0 if format_value(check.quantity, 0.5, check.main_metric) == "50.0" else 1.0
    low, high = check.stat_low * scale, check.stat_high * scale
    text = f"{check.stat * scale:+.3g}"
    if math.isfinite(low) and math.isfinite(high) and low != high:
        text += f" [{low:+.3g}, {high:+.3g}]"
    return text


def _threshold_text(check: Check) -> str:
    if check.rule == "not_worse" and format_value(check.quantity, 0.5, check.main_metric) == "50.0":
        return f"> −{100 * check.margin:.3g}"
    return check.threshold


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def results_table(results: Sequence[ClaimResult], out_dir: Path) -> pd.DataFrame:
    """claims.csv: one row per check (task × simple rule) with the claim's verdict beside it."""
    rows = []
    for res in results:
        figure = _relative(res.figures[0], out_dir) if res.figures else ""
        for c in res.checks:
            rows.append({
                "claim": res.claim.name, "paper": res.claim.paper, "method": res.claim.method,
                "reference": c.reference, "setting": res.claim.setting, "task": c.task, "rule": c.rule,
                "quantity": c.quantity, "n_method": c.n_method, "n_reference": c.n_reference, "value": c.value,
                "value_low": c.value_low, "value_high": c.value_high, "reference_value": c.reference_value,
                "statistic": c.statistic, "stat": c.stat, "stat_low": c.stat_low, "stat_high": c.stat_high,
                "threshold": c.threshold, "check_verdict": c.verdict, "reason": c.reason,
                "verdict": res.verdict_text, "figure": figure,
            })
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def _relative(path: Path, out_dir: Path) -> str:
    try:
        return Path(os.path.relpath(path, out_dir)).as_posix()
    except ValueError:
        return Path(path).as_posix()


def to_markdown(results: Sequence[ClaimResult], out_dir: Path) -> str:
    counts = {v: sum(r.verdict == v for r in results) for v in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)}
    lines = [
        "# Paper claims",
        "",
        f"{len(results)} claims (conf/claim/*.yaml), one per paper: {counts[REPRODUCED]} reproduced, "
        f"{counts[NOT_REPRODUCED]} not reproduced, {counts[INCONCLUSIVE]} inconclusive. Written by "
        "`python -m analysis claims` from the records alone (tuning-trial records left out); "
        "`python -m bench +claim=<name> -m` runs a claim's grid. How each verdict is computed: README.md beside "
        "this file and analysis/claims.py.",
        "",
        "Scores are ×100; an improvement is signed so that > 0 favours the method (a lower loss, a higher score), "
        "with its 95% interval over seeds (Welch; paired t for one method's own records; exact for deterministic "
        "quantities). A claim is checked on every task of its grid, and its verdict is the conjunction of its checks.",
        "",
        "| claim | paper | method | vs | rule | verdict | figure |",
        "|:--|:--|:--|:--|:--|:--|:--|",
    ]
    for res in results:
        c = res.claim
        figure = f"[png]({_relative(res.figures[0], out_dir)})" if res.figures else "—"
        refs = ", ".join(dict.fromkeys(ch.reference for ch in res.checks)) or c.reference
        lines.append(f"| [{c.name}](#{c.name}) | [{c.paper}](https://arxiv.org/abs/{c.paper}) | "
                     f"{method_label(c.method)} | {_md_escape(refs)} | {_md_escape(c.rule_text)} | "
                     f"{_md_escape(res.verdict_text)} | {figure} |")
    for res in results:
        c = res.claim
        lines += [
            "",
            f"## {c.name}",
            "",
            f"**{method_label(c.method)}** ([arXiv {c.paper}](https://arxiv.org/abs/{c.paper})): "
            f"{_md_escape(c.statement)}",
            "",
            f"- Setting: {_md_escape(c.setting)} (`{c.run_command}`, records in `{c.results_dir}`)",
            f"- Quantity: {_md_escape(c.quantity_text)}",
            f"- Rule: `{c.rule_text}`",
            f"- Verdict: **{_md_escape(res.verdict_text)}**",
        ]
        if res.figures:
            lines.append(f"- Figure: [{_relative(res.figures[0], out_dir)}]({_relative(res.figures[0], out_dir)})"
                         + "".join(f", [{p.suffix[1:]}]({_relative(p, out_dir)})" for p in res.figures[1:]))
        lines += [
            "",
            "| task | rule | quantity | method | n | measured [95% CI] | reference | n | reference value | "
            "statistic [95% CI] | needs | check |",
            "|:--|:--|:--|:--|--:|:--|:--|--:|:--|:--|:--|:--|",
        ]
        for ch in res.checks:
            verdict = ch.verdict + (f" ({ch.reason})" if ch.verdict == INCONCLUSIVE and ch.reason else "")
            ref_value = format_value(ch.quantity, ch.reference_value, ch.main_metric)
            n_ref = ch.n_reference if ch.n_reference or ch.reference[:1].isalpha() else ""  # blank for a constant
            lines.append(
                f"| {ch.task} | {ch.rule} | {_md_escape(ch.quantity)} | {_md_escape(ch.method)} | {ch.n_method} | "
                f"{_interval_text(ch.quantity, ch.value, ch.value_low, ch.value_high, ch.main_metric)} | "
                f"{_md_escape(ch.reference)} | {n_ref} | "
                f"{ref_value} | {_stat_text(ch)} | {_threshold_text(ch)} | {_md_escape(verdict)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- figures


def _figure_sides(claim: Claim) -> list[Side]:
    """The claim's method first, then every reference side of its rules (once each)."""
    out: list[Side] = []
    for leaf in leaves(dict(claim.spec)):
        method, ref, _ = _sides(leaf)
        for side in (method, ref):
            if side is not None and not any(s.method == side.method and s.select == side.select for s in out):
                out.append(Side(side.method, "metric", side.select))
    return out


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (the error bars of every claim figure; 0 for one seed)."""
    x = np.asarray([v for v in values if math.isfinite(v)], float)
    if x.size == 0:
        return math.nan, 0.0
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def _records_by_task(claim: Claim, pool: RecordPool, sides: Sequence[Side]) -> dict[str, dict[int, list]]:
    records = pool.records(claim.results_dir)
    out: dict[str, dict[int, list]] = {}
    for task in claim.tasks:
        per = {i: select_records(records, claim, s.method, task, s.select) for i, s in enumerate(sides)}
        if any(per.values()):
            out[task] = per
    return out


def _score_axis(ax: Any, records: Sequence[Mapping[str, Any]]) -> float:
    main = next((str(r.get("main_metric")) for r in records if r.get("main_metric")), "")
    ax.set_ylabel(plots.metric_label(main, scaled=True))
    return 100.0


def figure_digest(result: ClaimResult, pool: RecordPool) -> str:
    """What a claim's figure is drawn from (the records of its sides, the intruders CSV, the claim file, this
    module, the verdict in its title): an unchanged digest means an unchanged figure, which is not redrawn."""
    claim = result.claim
    sides = _figure_sides(claim)
    sides += [Side(m, "metric") for m in claim.grid.get("method", []) if m not in {s.method for s in sides}]
    used = sorted(f"{r.get('id')}@{_finished(r)}" for per in _records_by_task(claim, pool, sides).values()
                  for rs in per.values() for r in rs)
    blob = hashlib.sha256()
    for part in (Path(__file__).read_bytes(), Path(plots.__file__).read_bytes(), claim.path.read_bytes(),
                 result.verdict.encode(),
                 json.dumps(used).encode()):
        blob.update(hashlib.sha256(part).digest())
    for leaf in leaves(dict(claim.spec)):
        if leaf["quantity"] == "intruders":
            path = pool.intruders_path(claim.results_dir, leaf.get("source"))
            blob.update(hashlib.sha256(path.read_bytes() if path.is_file() else b"").digest())
    return blob.hexdigest()[:16]


def draw_figure(result: ClaimResult, pool: RecordPool, out_dir: Path) -> list[Path]:
    """The paper's kind of plot for the claim, one panel per task with records; [] when there is nothing to draw."""
    claim, kind = result.claim, result.claim.figure
    if kind == "intruders":
        return _figure_intruders(result, pool, out_dir)
    sides = _figure_sides(claim)
    if kind in ("memory", "params"):
        grid_methods = [m for m in claim.grid.get("method", []) if m not in {s.method for s in sides}]
        sides += [Side(m, "metric") for m in grid_methods]
    data = _records_by_task(claim, pool, sides)
    if not data:
        return []
    with plots.style():
        fig, axes = plots.new_figure(len(data))
        for ax, (task, per) in zip(axes, data.items()):
            everything = [r for rs in per.values() for r in rs]
            ax.set_title(plots.task_label(task))
            if kind == "curves":
                _panel_curves(ax, claim, sides, per)
            elif kind == "ranks":
                _panel_ranks(ax, sides, per, everything)
            elif kind in ("memory", "params"):
                _panel_pareto(ax, sides, per, everything, kind)
            elif kind == "recovery":
                _panel_recovery(ax, sides, per, everything)
            else:
                _panel_bars(ax, claim, sides, per, everything)
        handles = [Line2D([], [], color=plots.method_color(s.method), label=s.label,
                          marker=None if kind == "curves" else plots.method_marker(s.method),
                          linestyle="-" if kind in ("curves", "ranks") else "none") for s in sides]
        if kind != "recovery":
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4))
        fig.suptitle(f"{claim.name}: {result.verdict} (error bars: mean ± s.d. over seeds)",
                     fontsize=plots.STYLE["axes.titlesize"])
        return plots.save(fig, out_dir, claim.name)


def _panel_bars(ax: Any, claim: Claim, sides: Sequence[Side], per: Mapping[int, list], everything: list) -> None:
    leaf = leaves(dict(claim.spec))[0]
    quantity = str(leaf["quantity"])
    scale = 100.0 if quantity == "metric" else 1.0
    labels = []
    for i, side in enumerate(sides):
        q = quantity if i == 0 else str(leaf.get("reference_quantity") or quantity)
        values = [record_value(r, q, leaf) * scale for r in per[i]]
        color = plots.method_color(side.method)
        xs = i + np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.full(len(values), float(i))
        ax.scatter(xs, values, s=12, color=color, alpha=0.6, zorder=3, linewidths=0)
        mean, half = _mean_ci(values)
        if math.isfinite(mean):
            ax.errorbar(i + 0.28, mean, yerr=half or None, fmt=plots.method_marker(side.method), color=color,
                        zorder=4, markersize=4)
        labels.append(side.label)
    ax.set_xticks(range(len(sides)), labels, rotation=20, ha="right")
    ax.set_xlim(-0.6, len(sides) - 0.2)
    if quantity == "metric":
        _score_axis(ax, everything)
    else:
        ax.set_ylabel(quantity)


def _panel_curves(ax: Any, claim: Claim, sides: Sequence[Side], per: Mapping[int, list]) -> None:
    for i, side in enumerate(sides):
        curves = {}
        for r in per[i]:
            pts = {float(e["step"]): float(e["loss"]) for e in r.get("curve") or []
                   if isinstance(e, Mapping) and isinstance(e.get("loss"), (int, float))}
            curves[str(r.get("id"))] = pd.Series(pts)
        if not curves:
            continue
        table = pd.DataFrame(curves).sort_index()
        color = plots.method_color(side.method)
        steps = table.index.to_numpy(float)
        ax.plot(steps, table.mean(axis=1).to_numpy(float), color=color, zorder=3)
        if table.shape[1] > 1:
            ax.fill_between(steps, table.min(axis=1).to_numpy(float), table.max(axis=1).to_numpy(float),
                            color=color, alpha=0.18, linewidth=0, zorder=2)
    until = next((leaf.get("until") for leaf in leaves(dict(claim.spec)) if leaf.get("until")), None)
    if until:
        ax.axvline(float(until), color="0.5", linestyle=":", linewidth=0.8)
    ax.set_xlabel("Step")
    ax.set_ylabel("Training loss (mean; band: min–max over seeds)")
    ax.set_xlim(left=0)


_RANK_KEY = re.compile(r"^(?P<metric>.+)@r=(?P<rank>\d+)$")


def _panel_ranks(ax: Any, sides: Sequence[Side], per: Mapping[int, list], everything: list) -> None:
    scale = _score_axis(ax, everything)
    ranks_seen: set[int] = set()
    for i, side in enumerate(sides):
        rows = per[i]
        ranked: dict[int, list[float]] = {}
        for r in rows:
            main = r.get("main_metric")
            for key, value in (r.get("metrics") or {}).items():
                m = _RANK_KEY.match(str(key))
                if m and m["metric"] == main and isinstance(value, (int, float)):
                    ranked.setdefault(int(m["rank"]), []).append(float(value) * scale)
        color = plots.method_color(side.method)
        if ranked:
            ks = sorted(ranked)
            ranks_seen |= set(ks)
            stats_ = [_mean_ci(ranked[k]) for k in ks]
            ax.errorbar(ks, [s[0] for s in stats_], yerr=[s[1] for s in stats_], color=color,
                        marker=plots.method_marker(side.method), markersize=4, zorder=3)
        else:  # a plain run: its score as a horizontal line (its rank's band)
            mean, half = _mean_ci([record_value(r, "metric", {}) * scale for r in rows])
            if math.isfinite(mean):
                ax.axhline(mean, color=color, linewidth=1.0, linestyle="--", zorder=2)
                if half:
                    ax.axhspan(mean - half, mean + half, color=color, alpha=0.12, linewidth=0)
    if ranks_seen:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ranks_seen), [str(k) for k in sorted(ranks_seen)])
    ax.set_xlabel("Inference rank b")


def _panel_pareto(ax: Any, sides: Sequence[Side], per: Mapping[int, list], everything: list, kind: str) -> None:
    scale = _score_axis(ax, everything)
    column = "cost.optimizer_state_bytes" if kind == "memory" else "params.trainable"
    divisor = 1e6 if kind == "memory" else 1.0
    for i, side in enumerate(sides):
        rows = per[i]
        if not rows:
            continue
        x = float(np.nanmedian([record_value(r, column, {}) for r in rows])) / divisor
        mean, half = _mean_ci([record_value(r, "metric", {}) * scale for r in rows])
        if not (math.isfinite(x) and math.isfinite(mean)) or x <= 0:
            continue
        color = plots.method_color(side.method)
        ax.errorbar(x, mean, yerr=half or None, fmt=plots.method_marker(side.method), color=color, zorder=3)
        ax.annotate(side.label, (x, mean), textcoords="offset points", xytext=(4, 3), fontsize=6.5, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("Optimizer state (MB, log scale)" if kind == "memory" else "Trainable parameters (log scale)")


def _panel_recovery(ax: Any, sides: Sequence[Side], per: Mapping[int, list], everything: list) -> None:
    scale = _score_axis(ax, everything)
    rows = per[0]
    main = next((str(r.get("main_metric")) for r in rows), "")
    parts = [("base (fine-tuned)", f"metrics.base/{main}"), ("compressed", f"metrics.compressed/{main}"),
             ("compensated", "metric")]
    color = plots.method_color(sides[0].method)
    for j, (label, q) in enumerate(parts):
        values = [record_value(r, q, {}) * scale for r in rows]
        mean, half = _mean_ci(values)
        if math.isfinite(mean):
            ax.bar(j, mean, yerr=half or None, color=color, alpha=0.35 + 0.25 * j, width=0.6)
            ax.scatter(np.full(len(values), float(j)), values, s=9, color="0.2", zorder=3, linewidths=0)
    ax.set_xticks(range(3), [p[0] for p in parts], rotation=15, ha="right")
    finite = [record_value(r, q, {}) * scale for r in rows for _, q in parts]
    finite = [v for v in finite if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max(hi - lo, 1.0) * 0.3
        ax.set_ylim(lo - pad, hi + pad)


def _figure_intruders(result: ClaimResult, pool: RecordPool, out_dir: Path) -> list[Path]:
    claim = result.claim
    leaf = next(leaf for leaf in leaves(dict(claim.spec)) if leaf["quantity"] == "intruders")
    frame = pool.intruders(claim.results_dir, leaf.get("source"))
    if frame is None:
        return []
    sides = _figure_sides(claim)
    tasks = [t for t in claim.tasks if (frame["task"] == t).any()]
    if not tasks:
        return []
    with plots.style():
        fig, axes = plots.new_figure(len(tasks))
        for ax, task in zip(axes, tasks):
            for side in sides:
                curve = []
                for eps in sorted(frame["eps"].unique()):
                    values = list(_intruder_values(frame, side, task, claim, {"eps": eps}).values())
                    if values:
                        curve.append((eps, *_mean_ci(values)))
                if curve:
                    xs, ys, err = zip(*curve)
                    ax.errorbar(xs, ys, yerr=err, color=plots.method_color(side.method),
                                marker=plots.method_marker(side.method), markersize=3.5, label=side.label)
            ax.axvline(float(leaf.get("eps", 0.5)), color="0.5", linestyle=":", linewidth=0.8)
            ax.set_title(plots.task_label(task))
            ax.set_xlabel("ε (cosine threshold)")
            ax.set_ylabel("Intruder dimensions (total over layers)")
            ax.legend()
        fig.suptitle(f"{claim.name}: {result.verdict} (error bars: mean ± s.d. over seeds)",
                     fontsize=plots.STYLE["axes.titlesize"])
        return plots.save(fig, out_dir, claim.name)


# ---------------------------------------------------------------------------------------------- report


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_claims_report(root: Path = Path("."), out_dir: Path | None = None, conf_dir: Path | None = None,
                        figures: bool = True) -> tuple[list[Path], list[ClaimResult]]:
    """Evaluate every claim, draw its figure, write claims.md and claims.csv; return the paths (claims.md,
    claims.csv, then the figures) and the results."""
    root = Path(root)
    conf_dir = CLAIM_DIR if conf_dir is None else Path(conf_dir)
    out_dir = Path(out_dir) if out_dir is not None else root / DEFAULT_OUT
    pool = RecordPool(root)
    claims = load_claims(conf_dir)
    results = []
    figure_dir = out_dir / "figures"
    index = figure_dir / DIGESTS
    digests = json.loads(index.read_text()) if index.is_file() else {}
    new_digests: dict[str, str] = {}
    for claim in claims:
        problems = claim_problems(claim)
        if problems:
            raise ClaimError(f"{claim.path}: " + "; ".join(problems))
        result = evaluate_claim(claim, pool)
        if figures and result.has_records:
            digest = figure_digest(result, pool)
            cached = [figure_dir / f"{claim.name}{suffix}" for suffix in (".png", ".pdf")]
            if digests.get(claim.name) == digest and all(p.is_file() for p in cached):
                result.figures = cached  # the same inputs drew it before: the files are as they would be
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # tight layouts of small panels
                    result.figures = draw_figure(result, pool, figure_dir)
            if result.figures:
                new_digests[claim.name] = digest
        if not result.figures:
            for suffix in (".png", ".pdf"):
                (figure_dir / f"{claim.name}{suffix}").unlink(missing_ok=True)  # a stale figure of an earlier run
        results.append(result)
    if new_digests or index.is_file():
        _write_text(index, json.dumps(new_digests, indent=1, sort_keys=True) + "\n")
    paths = [_write_text(out_dir / "claims.md", to_markdown(results, out_dir))]
    table = results_table(results, out_dir)
    csv_path = out_dir / "claims.csv"
    tmp = csv_path.with_name(".claims.csv.tmp")
    table.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(csv_path)
    paths.append(csv_path)
    paths += [p for r in results for p in r.figures]
    return paths, results

"""The tuning protocol's pieces shared by the sweeper (hydra_plugins/deltabench/tune_sweeper.py) and the run.

A study tunes one grid cell (method × task × model × any other swept key) under a protocol (conf/protocol): the
method's `search:` block (conf/method/<name>.yaml) gives the space, Optuna samples it (a seeded grid or TPE), every
trial trains protocol budget steps on the train split without the protocol's validation holdout and reports its
validation score every `prune_every` steps to the pruner; the best completed trial is then rerun with every seed of
the protocol on the task's eval split, and only those reruns are reported.

The run records are the source of truth: a study is rebuilt from its trial records at the start of every sweep (in
an SQLite file of that sweep, which the trials of the sweep report into), and the sampler is reseeded with the
number of trials it has seen, so a killed study resumes where it stopped and proposes what it would have proposed:
a trial that was running when the sweep died is proposed again with the same values, i.e. the same cell, and its run
resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

SEARCH_KEY = "search"
#: Record statuses of trials and the Optuna state each is rebuilt as; running and preempted trials are left out
#: (the sweep proposes them again, and their runs resume).
TRIAL_STATES = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
                "diverged": TrialState.FAIL, "failed": TrialState.FAIL}
#: Protocol keys that change what a study computes (its name hashes them); trials and seeds only extend it.
STUDY_KEYS = ("name", "sampler", "grid_points", "sampler_seed", "tune_keys", "trial_seed", "validation", "pruner",
              "prune_every", "pruner_startup_trials")

optuna.logging.set_verbosity(optuna.logging.WARNING)


class TuningError(ValueError):
    """A search space or protocol that cannot be tuned (the message names the YAML key to fix)."""


class Pruned(RuntimeError):
    """The pruner stopped a trial: its validation score at `step` was below the median of earlier trials."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value
        super().__init__(f"pruned at step {step} (validation objective {value:.4g})")


def search_space(method_cfg: Mapping[str, Any], keys: Sequence[str] | None, option: str) -> dict[str, BaseDistribution]:
    """The Optuna distributions of the method's `search:` block, restricted to `keys` (None: all of them).

    Each entry is `{low, high, log}` (a float range; ints when both bounds are ints and `int: true`) or
    `{choices: [...]}`; every key names a key of the method's config.
    """
    search = dict(method_cfg.get(SEARCH_KEY) or {})
    where = f"conf/method/{option}.yaml"
    if not search:
        raise TuningError(f"method={option} has no `search:` block in {where}: declare at least "
                          "`lr: {low: ..., high: ..., log: true}` to tune it")
    names = list(search) if keys is None else list(keys)
    missing = [k for k in names if k not in search]
    if missing:
        raise TuningError(f"protocol.tune_keys names {missing}, which the `search:` block of {where} lacks "
                          f"(it has {sorted(search)})")
    space: dict[str, BaseDistribution] = {}
    for name in names:
        spec = dict(search[name])
        if name not in method_cfg:
            raise TuningError(f"{where}: search.{name} tunes a key the method does not have")
        if "choices" in spec:
            space[name] = CategoricalDistribution(list(spec["choices"]))
            continue
        try:
            low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        except KeyError as e:
            raise TuningError(f"{where}: search.{name} needs low and high (or choices); got {spec}") from e
        if not low < high or (log and low <= 0):
            raise TuningError(f"{where}: search.{name} needs low < high (and low > 0 on a log scale); got {spec}")
        if spec.get("int"):
            space[name] = IntDistribution(int(low), int(high), log=log)
        else:
            space[name] = FloatDistribution(float(low), float(high), log=log)
    return space


def grid(space: Mapping[str, BaseDistribution], points: int) -> dict[str, list[Any]]:
    """The values a grid search visits: `points` values per float or int range (log-spaced on a log scale,
    rounded to 3 significant digits so the overrides stay readable and a range of default/10 .. default·√10 holds
    the default itself), every choice of a categorical."""
    out: dict[str, list[Any]] = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            out[name] = list(dist.choices)
            continue
        values = (np.geomspace if dist.log else np.linspace)(dist.low, dist.high, points)
        if isinstance(dist, IntDistribution):
            out[name] = sorted({int(round(v)) for v in values})
        else:
            out[name] = [float(f"{v:.3g}") for v in values]
    return out


def grid_order(protocol: Mapping[str, Any], space: Mapping[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Every point of the grid, in an order seeded by protocol.sampler_seed (fewer trials than points visit a
    seeded random subset)."""
    values = grid(space, int(protocol["grid_points"]))
    points = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    order = np.random.default_rng(int(protocol["sampler_seed"])).permutation(len(points))
    return [points[i] for i in order]


def next_params(protocol: Mapping[str, Any], space: Mapping[str, BaseDistribution], study: optuna.Study) -> dict[str, Any] | None:
    """The grid point a grid study tries next: the first in grid_order that no trial of the study holds (None under
    TPE, which samples for itself)."""
    if protocol["sampler"] != "grid":
        return None
    tried = [t.params for t in study.get_trials(deepcopy=False)]
    return next((p for p in grid_order(protocol, space) if p not in tried), None)


def make_sampler(protocol: Mapping[str, Any], space: Mapping[str, BaseDistribution], seen: int) -> optuna.samplers.BaseSampler:
    """A sampler seeded with protocol.sampler_seed + `seen` (the trials already in the study): deterministic given
    the history, which is what lets a rebuilt study propose what the interrupted one would have. A grid study's
    points are enqueued from `next_params` instead (also a function of the history alone)."""
    seed = int(protocol["sampler_seed"]) + seen
    if protocol["sampler"] == "grid":  # the points come from next_params (enqueued); this only samples nothing
        return optuna.samplers.RandomSampler(seed=seed)
    if protocol["sampler"] == "tpe":
        startup = max(2, int(protocol["trials"]) // 3)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
    raise TuningError(f"protocol.sampler must be grid or tpe, got {protocol['sampler']!r}")


def make_pruner(protocol: Mapping[str, Any], max_steps: int) -> optuna.pruners.BasePruner:
    kind = protocol["pruner"]
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(protocol["pruner_startup_trials"]))
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=int(protocol["prune_every"]), max_resource=int(max_steps),
                                              reduction_factor=3)
    if kind in ("none", None):
        return optuna.pruners.NopPruner()
    raise TuningError(f"protocol.pruner must be median, hyperband or none, got {kind!r}")


def grid_size(protocol: Mapping[str, Any], space: Mapping[str, BaseDistribution]) -> int | None:
    if protocol["sampler"] != "grid":
        return None
    return math.prod(len(v) for v in grid(space, int(protocol["grid_points"])).values())


def check_protocol(protocol: Mapping[str, Any], space: Mapping[str, BaseDistribution], option: str) -> None:
    """Fail before any training on a protocol that cannot give every method the same number of trials."""
    trials = int(protocol["trials"])
    if trials < 1 or not list(protocol["seeds"]):
        raise TuningError(f"protocol={protocol['name']}: trials must be >= 1 and seeds non-empty")
    size = grid_size(protocol, space)
    if size is not None and trials > size:
        raise TuningError(f"protocol={protocol['name']}: {trials} trials but the grid of method={option} has only "
                          f"{size} points; raise protocol.grid_points or lower protocol.trials")


def study_name(names: Mapping[str, str], semantic: Mapping[str, Any], protocol: Mapping[str, Any],
               space: Mapping[str, BaseDistribution]) -> str:
    """`<task>__<method>__<model>__<protocol>__<hash>`: the hash covers the cell's semantic config (bench.run's
    semantic_config) without the seed, the tuned keys, the tuning bookkeeping and the protocol's trial and seed
    counts, plus the search space: the same cell gets the same study from any experiment or command line, a
    changed space or budget starts a new one, and more trials or seeds extend the old one."""
    config = {k: v for k, v in semantic.items() if k not in ("seed", "tune", "protocol")}
    config["method"] = {k: v for k, v in (config.get("method") or {}).items() if k not in space and k != SEARCH_KEY}
    blob = json.dumps({"names": dict(names), "config": config, "protocol": {k: protocol.get(k) for k in STUDY_KEYS},
                       "space": {k: repr(v) for k, v in space.items()}}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    return f"{names['task'].replace('/', '-')}__{names['method'].replace('/', '-')}__{names['model']}__{protocol['name']}__{digest}"


def objective(metrics: Mapping[str, float], main_metric: str, higher_is_better: bool) -> float:
    """The value a study maximises: the main metric, negated when lower is better; NaN when missing."""
    value = metrics.get(main_metric, math.nan)
    value = float(value) if isinstance(value, (int, float)) else math.nan
    return value if higher_is_better else -value


def _trial_from_record(record: Mapping[str, Any], space: Mapping[str, BaseDistribution]) -> optuna.trial.FrozenTrial | None:
    tuning = record.get("tuning") or {}
    state = TRIAL_STATES.get(record.get("status"))
    params = tuning.get("params") or {}
    if state is None or set(params) != set(space):
        return None
    value = tuning.get("objective")
    if state is TrialState.COMPLETE and not (isinstance(value, (int, float)) and math.isfinite(value)):
        state, value = TrialState.FAIL, None
    try:  # create_trial checks every value against its distribution: a trial of a changed space is left out
        return optuna.trial.create_trial(
            params=dict(params), distributions=dict(space), state=state,
            value=float(value) if state is TrialState.COMPLETE else None,
            intermediate_values={int(k): float(v) for k, v in (tuning.get("intermediate") or {}).items()},
            user_attrs={"run_id": record.get("id"), "status": record.get("status")},
        )
    except ValueError:
        return None


def rebuild_study(storage: str, name: str, trial_records: Sequence[Mapping[str, Any]],
                  space: Mapping[str, BaseDistribution], pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """A fresh study named `name` in `storage` holding the finished trials among `trial_records` (oldest first).
    Trials of another search space (a changed YAML) are left out; so are running and preempted ones."""
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner)
    ordered = sorted(trial_records, key=lambda r: ((r.get("timestamps") or {}).get("created") or "", r.get("id") or ""))
    seen: set[str] = set()
    for record in ordered:
        trial = _trial_from_record(record, space)
        if trial is not None and record.get("id") not in seen:
            seen.add(record["id"])
            study.add_trial(trial)
    return study


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that used up budget: complete, pruned or failed (a failed trial counts: equal effort per method)."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed trial with the highest objective (the earliest on a tie); None when none completed."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state is TrialState.COMPLETE and t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def override_value(value: Any) -> str:
    """A value as a Hydra override: floats with full precision, strings quoted when needed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return json.dumps(value)
    return str(value)


class TrialReporter:
    """The trial side of pruning: reports the validation objective into the trial's storage and raises Pruned
    when the pruner says so. Without a storage (a trial run by hand) it only remembers the values."""

    def __init__(self, storage: str | None, study: str | None, trial_id: int | None, main_metric: str,
                 higher_is_better: bool, pruner: optuna.pruners.BasePruner | None = None) -> None:
        self.main_metric, self.higher = main_metric, higher_is_better
        self.values: dict[int, float] = {}
        self.trial = None
        if storage and study and trial_id is not None:
            # the study's pruner lives in the sweep, not in the storage: the protocol builds the same one here
            loaded = optuna.load_study(study_name=study, storage=storage, pruner=pruner or optuna.pruners.NopPruner())
            self.trial = optuna.trial.Trial(loaded, int(trial_id))

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        value = objective(metrics, self.main_metric, self.higher)
        if not math.isfinite(value):
            return
        self.values[int(step)] = value
        if self.trial is not None:
            self.trial.report(value, int(step))
            if self.trial.should_prune():
                raise Pruned(int(step), value)


@dataclass
class Study:
    """One grid cell's study: its overrides, protocol, space, store and the Optuna study rebuilt from records."""

    name: str
    overrides: list[str]
    protocol: dict[str, Any]
    space: dict[str, Any]
    store: Any  # bench.store.RunStore
    study: optuna.Study
    storage: str
    sharpness: dict[str, Any] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_trials(self) -> bool:
        return len(finished(self.study)) < int(self.protocol["trials"])

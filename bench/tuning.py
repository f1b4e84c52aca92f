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
#: Keys of a sharpness-guided protocol (conf/protocol/sharp.yaml), hashed into a study's name only where the
#: protocol has them, so that the names of studies run before they existed stay what they were.
GUIDE_KEYS = ("lr_from_sharpness", "sharpness_span")
#: A sharpness-guided search needs the tuned learning rates of at least this many other methods to fit its guess.
MIN_FIT_METHODS = 5

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
    hashed = {k: protocol.get(k) for k in STUDY_KEYS} | {k: protocol[k] for k in GUIDE_KEYS if k in protocol}
    blob = json.dumps({"names": dict(names), "config": config, "protocol": hashed,
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
    names: dict[str, str] = field(default_factory=dict)  # the cell's option names (task, method, model)
    window: dict[str, Any] | None = None  # a sharpness-guided study's learning-rate window (lr_window)
    reference: Any = None  # the results dir whose tuned studies the guide's fit reads (a Path)
    window_file: Any = None  # where the sweep wrote `window` for its trials to record (a Path)

    @property
    def needs_trials(self) -> bool:
        return len(finished(self.study)) < int(self.protocol["trials"])


# ---------------------------------------------------------------------------------------- sharpness as a guide
@dataclass(frozen=True)
class SharpnessFit:
    """log10(tuned lr) = intercept + slope · log10(λ_max at init), least squares over tuned studies of one model."""

    slope: float
    intercept: float
    residual_sd: float  # of log10 lr, in decades
    methods: tuple[str, ...]

    def guess(self, lambda_max: float) -> float:
        return 10 ** (self.intercept + self.slope * math.log10(lambda_max))

    def as_record(self) -> dict[str, Any]:
        return {"slope": self.slope, "intercept": self.intercept, "residual_sd": self.residual_sd,
                "n": len(self.methods), "methods": list(self.methods)}


def tuned_lr_points(records: Sequence[Mapping[str, Any]], model: str) -> list[tuple[str, float, float]]:
    """(method, λ_max, chosen lr) of every study of `model` whose reported runs record both, from a search over
    the method's own range (a sharpness-guided study is left out: its choice came from a guess)."""
    points: dict[tuple[str, str], tuple[str, float, float]] = {}
    for r in records:
        tuning = r.get("tuning") or {}
        if tuning.get("role") != "final" or r.get("model") != model or tuning.get("lr_window"):
            continue
        sharp = (tuning.get("sharpness") or {}).get("lambda_max")
        lr = (tuning.get("chosen") or {}).get("lr")
        if isinstance(sharp, (int, float)) and sharp > 0 and isinstance(lr, (int, float)) and lr > 0:
            points[(r.get("task"), r.get("method"))] = (str(r.get("method")), float(sharp), float(lr))
    return sorted(points.values())


def fit_sharpness(points: Sequence[tuple[str, float, float]], leave_out: str) -> SharpnessFit:
    """The log-log line through the (λ_max, tuned lr) of every method but `leave_out`: a method's guess never uses
    its own tuned rate, which is what a new method gets and what makes the guess's evaluation honest."""
    kept = [(m, s, lr) for m, s, lr in points if m != leave_out]
    methods = tuple(sorted({m for m, _, _ in kept}))
    if len(methods) < MIN_FIT_METHODS:
        raise TuningError(
            f"protocol.lr_from_sharpness needs the tuned learning rates of at least {MIN_FIT_METHODS} other methods "
            f"on this model (found {len(methods)}: {', '.join(methods) or 'none'}); tune some under protocol=cheap "
            "first, or point tune.lr_reference at a results dir that holds them (e.g. tune.lr_reference=results/zoo)")
    x = np.log10([s for _, s, _ in kept])
    y = np.log10([lr for _, _, lr in kept])
    if np.ptp(x) == 0:
        raise TuningError("protocol.lr_from_sharpness: every reference study has the same λ_max; no line to fit")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    sd = float(np.sqrt((residual ** 2).sum() / max(len(x) - 2, 1)))
    return SharpnessFit(float(slope), float(intercept), sd, methods)


def round3(value: float) -> float:
    return float(f"{value:.3g}")


def lr_window(fit: SharpnessFit, sharpness: Mapping[str, Any], span: float) -> dict[str, Any]:
    """The narrowed learning-rate range of a sharpness-guided study: `span` decades centred (in log space) on the
    fit's guess, its ends rounded to 3 significant digits so that a grid over it visits exactly its ends."""
    lam = sharpness.get("lambda_max")
    if not (isinstance(lam, (int, float)) and lam > 0):
        raise TuningError(f"protocol.lr_from_sharpness: the probe measured λ_max = {lam} (no dominant positive "
                          "curvature, e.g. a B = 0 init whose negative side wins; bench/sharpness.py); tune this "
                          "method with protocol=cheap instead")
    if not span > 0:
        raise TuningError(f"protocol.sharpness_span must be > 0 decades, got {span}")
    guess = fit.guess(float(lam))
    return {"guess": guess, "low": round3(guess * 10 ** (-span / 2)), "high": round3(guess * 10 ** (span / 2)),
            "span_decades": span, "lambda_max": float(lam), "fit": fit.as_record()}


def narrowed(space: Mapping[str, BaseDistribution], window: Mapping[str, Any]) -> dict[str, BaseDistribution]:
    """`space` with its learning rate replaced by the window's log range."""
    if "lr" not in space:
        raise TuningError("protocol.lr_from_sharpness narrows the learning rate: add lr to protocol.tune_keys")
    return {**space, "lr": FloatDistribution(float(window["low"]), float(window["high"]), log=True)}

"""`hydra/sweeper=tune`: every cell of a grid gets the same tuning effort, then only its best is reported.

    python -m bench +experiment=zoo_tuned -m
    python -m bench hydra/sweeper=tune protocol=cheap -m method=lora,dora task=glue/sst2,glue/rte

The grid is parsed as hydra/sweeper=basic parses it (its `params` and the command line); each of its cells becomes
an Optuna study (bench/tuning.py) under the composed `protocol`:

1. trials: rounds of one trial per unfinished study (so a SLURM launcher runs the studies side by side), each a run
   with `tune.role=trial`, the sampled values as method overrides, protocol.trial_seed, scored on the protocol's
   validation split and pruned by its pruner; the first trial of a study also measures sharpness at init;
2. finals: the best completed trial of each study rerun with every seed of protocol.seeds (`tune.role=final`),
   each record carrying the study's summary (bench.run.tuning_block).

Under a sharpness-guided protocol (protocol.lr_from_sharpness, conf/protocol/sharp.yaml) each study first runs a
probe (`tune.role=probe`: λ_max at init, no training), then narrows its learning-rate range to protocol.sharpness_span
decades around the guess of a log-log line through the tuned studies of the other methods on the same model
(bench.tuning.fit_sharpness, read from tune.lr_reference or the results dir); every trial records that window.

Why not hydra-optuna-sweeper: its last release pins optuna<3 (which needs SQLAlchemy<2, against this project's
MLflow pin), it has no pruning (a job only returns its final value) and no seeded reruns of the best trial.

The studies are rebuilt from the trial records at the start (bench.tuning.rebuild_study), in an SQLite file of this
sweep (`<sweep dir>/tuning.db`) that the trials report into; records stay the source of truth, so a killed sweep
rerun with the same command continues each study where it stopped, and a grown protocol.trials extends it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:  # Hydra imports every plugin module at start-up: Optuna only loads when a sweep runs
    import optuna

    from bench.tuning import Study

log = logging.getLogger(__name__)


class TuneSweeper(Sweeper):
    """Optuna studies per grid cell, equal trials for every method, the best rerun with the protocol's seeds."""

    def __init__(self, params: dict[str, str] | None = None, max_batch_size: int | None = None) -> None:
        self.params = dict(params or {})
        self.max_batch_size = max_batch_size
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None
        self.job_idx = 0
        self._trial_records: dict[str, list[dict[str, Any]]] = {}  # results dir -> its trial records

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ------------------------------------------------------------------ the grid
    def cells(self, arguments: list[str]) -> list[list[str]]:
        """The grid's cells as override lists (the cartesian product of every swept key)."""
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        for o in overrides:
            if o.get_key_element().lstrip("+~") == "seed":
                raise HydraException("hydra/sweeper=tune takes its seeds from the protocol (protocol.trial_seed for "
                                     "trials, protocol.seeds for the reported runs): drop seed= from the command")
        return [list(c) for c in BasicSweeper.split_arguments(overrides, None)[0]]

    def make_study(self, overrides: list[str], storage: str) -> Study:
        from bench.store import RunStore
        from bench.tuning import (
            Study, TuningError, check_protocol, make_pruner, narrowed, rebuild_study, search_space, study_name)

        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        from bench.run import cell_names, semantic_config

        names = cell_names(cfg, cfg.hydra.runtime.choices)  # peft/<tuner>/<variant> for a PEFT config run
        option = str(cfg.hydra.runtime.choices["method"])  # the YAML that holds the search space
        protocol = OmegaConf.to_container(cfg.protocol, resolve=True)
        if protocol["name"] != "none" and "trials" not in protocol:
            raise HydraException(f"protocol={protocol['name']} is a fixed training setting, not a tuning protocol: "
                                 "drop hydra/sweeper=tune (or tune under protocol=cheap)")
        if protocol["name"] == "none":
            raise HydraException("hydra/sweeper=tune needs a tuning protocol: add protocol=cheap (or protocol=paper), "
                                 "or use an experiment that selects one (+experiment=zoo_tuned)")
        try:
            space = search_space(OmegaConf.to_container(cfg.method, resolve=True), protocol.get("tune_keys"),
                                 option)
            check_protocol(protocol, space, option)
        except TuningError as e:
            raise HydraException(str(e)) from e
        name = study_name(names, semantic_config(cfg), protocol, space)  # the method's own range: known up front
        store = RunStore(Path(cfg.results_dir))
        mine = [r for r in self.trial_records(store) if r["tuning"].get("study") == name]
        trials = [r for r in mine if r["tuning"]["role"] == "trial"]
        window = next((r["tuning"]["lr_window"] for r in trials if r["tuning"].get("lr_window")), None)
        if protocol.get("lr_from_sharpness") and window is not None:
            space = narrowed(space, window)  # fixed by the study's first trial, whatever the store holds since
        pruner = make_pruner(protocol, int(cfg.train.max_steps))
        study = rebuild_study(storage, name, trials, space, pruner)
        sharp = next(((r["tuning"]["sharpness"]) for r in mine if (r.get("tuning") or {}).get("sharpness")), None)
        defaults = {k: cfg.method.get(k) for k in space}  # the YAML's values: the untuned point of comparison
        reference = Path(str(cfg.tune.get("lr_reference") or cfg.results_dir))
        return Study(name, overrides, protocol, space, store, study, storage, sharpness=sharp, defaults=defaults,
                     names=names, window=window, reference=reference)

    def trial_records(self, store: Any) -> list[dict[str, Any]]:
        """The tuning-trial and probe records of a store, read once per sweep (every study of a grid looks in them)."""
        key = str(store.root.resolve())
        if key not in self._trial_records:
            self._trial_records[key] = [r for r in store.records()
                                        if (r.get("tuning") or {}).get("role") in ("trial", "probe")]
        return self._trial_records[key]

    # ------------------------------------------------------------------ sharpness as a guide
    def guide(self, studies: list[Study], sweep_dir: Path) -> None:
        """Probe λ_max where a guided study has none, then fix each study's learning-rate window from the fit."""
        from bench.store import RunStore, atomic_write_json
        from bench.tuning import TuningError, fit_sharpness, lr_window, narrowed, tuned_lr_points

        unmeasured = [s for s in studies if s.sharpness is None]
        if unmeasured:
            probes = [[*s.overrides, "tune.role=probe", f"tune.study={s.name}", f"seed={s.protocol['trial_seed']}"]
                      for s in unmeasured]
            for s, ret in zip(unmeasured, self.launch(probes)):
                record = self.read_return(s, ret)
                s.sharpness = ((record or {}).get("tuning") or {}).get("sharpness")
                if not s.sharpness:
                    status = (record or {}).get("status", "no record")
                    message = ((record or {}).get("error") or {}).get("message", "")
                    raise HydraException(f"study {s.name}: the sharpness probe ended {status} {message}; fix it, "
                                         "or tune this method with protocol=cheap")
        references: dict[Path, list[dict[str, Any]]] = {}
        for s in studies:
            if s.window is None:
                if s.reference not in references:
                    references[s.reference] = RunStore(s.reference).records()
                try:
                    fit = fit_sharpness(tuned_lr_points(references[s.reference], s.names["model"]),
                                        leave_out=s.names["method"])
                    s.window = lr_window(fit, s.sharpness, float(s.protocol["sharpness_span"]))
                    s.space = narrowed(s.space, s.window)
                except TuningError as e:
                    raise HydraException(f"study {s.name}: {e}") from e
                log.info("study %s: λ_max %.3g -> lr %.3g, searching [%.3g, %.3g]", s.name, s.window["lambda_max"],
                         s.window["guess"], s.window["low"], s.window["high"])
            s.window_file = sweep_dir / "studies" / f"{s.name}.window.json"
            atomic_write_json(s.window_file, s.window)

    # ------------------------------------------------------------------ the sweep
    def sweep(self, arguments: list[str]) -> Any:
        from bench.tuning import finished

        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage = f"sqlite:///{(sweep_dir / 'tuning.db').resolve()}"
        every = [self.make_study(cell, storage) for cell in self.cells(arguments)]  # all checked before any training
        guided = [s for s in every if s.protocol.get("lr_from_sharpness")]
        if guided:
            self.guide([s for s in guided if s.needs_trials or s.window is not None], sweep_dir)
        for s in every:
            log.info("study %s: %d of %d trials finished", s.name, len(finished(s.study)), s.protocol["trials"])
        size = self.max_batch_size or len(every)
        returns: list[Sequence[JobReturn]] = []
        for start in range(0, len(every), size):
            returns += self.sweep_studies(every[start:start + size], sweep_dir)
        return returns

    def sweep_studies(self, studies: list[Study], sweep_dir: Path) -> list[Sequence[JobReturn]]:
        """Trials of `studies` side by side (one per study per round), then their reported reruns."""
        from bench.store import atomic_write_json
        from bench.tuning import best_trial, make_sampler, next_params, override_value

        returns: list[Sequence[JobReturn]] = []
        while pending := [s for s in studies if s.needs_trials]:
            batch, asked = [], []
            for s in pending:
                # the sampler is reseeded from the history: a rebuilt study asks what the interrupted one would have
                s.study.sampler = make_sampler(s.protocol, s.space, len(s.study.get_trials(deepcopy=False)))
                point = next_params(s.protocol, s.space, s.study)
                if point is not None:
                    s.study.enqueue_trial(point)
                trial = s.study.ask(fixed_distributions=s.space)
                asked.append((s, trial))
                batch.append(self.trial_overrides(s, trial))
            results = self.launch(batch)
            for (s, trial), ret in zip(asked, results):
                self.tell(s, trial, ret)
            returns.append(results)

        finals = []
        for s in studies:
            best = best_trial(s.study)
            if best is None:
                log.error("study %s: no trial completed (all pruned, diverged or failed): nothing to report", s.name)
                continue
            effort = self.effort(s, best)
            path = sweep_dir / "studies" / f"{s.name}.json"
            atomic_write_json(path, effort)
            chosen = [f"method.{k}={override_value(v)}" for k, v in best.params.items()]
            for seed in s.protocol["seeds"]:
                finals.append([*s.overrides, *chosen, "tune.role=final", f"tune.study={s.name}",
                               f"tune.effort_file={path.resolve()}", f"seed={seed}"])
        if finals:
            returns.append(self.launch(finals))
        return returns

    def trial_overrides(self, s: Study, trial: optuna.Trial) -> list[str]:
        from bench.tuning import override_value

        first = len(s.study.get_trials(deepcopy=False)) == 1 and s.sharpness is None
        return [*s.overrides, *(f"method.{k}={override_value(v)}" for k, v in trial.params.items()),
                "tune.role=trial", f"tune.study={s.name}", f"tune.storage={s.storage}",
                f"tune.trial_id={trial._trial_id}",  # noqa: SLF001  (Optuna's Trial(study, trial_id) needs the id)
                f"tune.sharpness={'true' if first else 'false'}", f"seed={s.protocol['trial_seed']}",
                *([f"tune.window_file={s.window_file.resolve()}"] if s.window_file else [])]

    def launch(self, batch: list[list[str]]) -> Sequence[JobReturn]:
        assert self.launcher is not None
        results = self.launcher.launch(batch, initial_job_idx=self.job_idx)
        self.job_idx += len(batch)
        return results

    @staticmethod
    def read_return(s: Study, ret: JobReturn, what: str = "probe") -> dict[str, Any] | None:
        """The record of a launched run (the launcher's return only names it); None for a job that raised."""
        try:
            value = ret.return_value
            run_id = value.get("id") if isinstance(value, dict) else None
            return s.store.read(run_id) if run_id else None
        except Exception as e:  # a job that raised in-process (hydra/launcher=basic)
            log.error("%s of %s failed: %s", what, s.name, e)
            return None

    def tell(self, s: Study, trial: optuna.Trial, ret: JobReturn) -> None:
        """Give the study the trial's outcome, read from its record (the launcher's return only names it)."""
        import optuna

        record = self.read_return(s, ret, f"trial {trial.number}")
        status = (record or {}).get("status")
        tuning = (record or {}).get("tuning") or {}
        if record is not None:
            trial.set_user_attr("run_id", record["id"])
        if status == "completed" and tuning.get("objective") is not None:
            s.study.tell(trial, float(tuning["objective"]))
        elif status == "pruned":
            s.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            s.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if record is not None and tuning.get("sharpness") and s.sharpness is None:
            s.sharpness = tuning["sharpness"]
        log.info("study %s trial %d %s: %s", s.name, trial.number, trial.params, status)

    def effort(self, s: Study, best: optuna.trial.FrozenTrial) -> dict[str, Any]:
        """The study's summary that each reported run records."""
        from bench.tuning import finished

        states = [t.state.name.lower() for t in finished(s.study)]
        return {
            "trials": {"total": len(states), **{k: states.count(k) for k in ("complete", "pruned", "fail")}},
            "sampler": s.protocol["sampler"], "pruner": s.protocol["pruner"],
            "tuned_keys": sorted(s.space), "chosen": dict(best.params), "defaults": dict(s.defaults),
            "val_objective": best.value, "best_trial_run": best.user_attrs.get("run_id"),
            "trial_values": [{"params": t.params, "state": t.state.name.lower(), "objective": t.value}
                             for t in finished(s.study)],
            "sharpness": s.sharpness,
            **({"lr_window": s.window} if s.window else {}),
        }

"""One run of one grid cell, top to bottom: setup → wrap → calibrate → train → evaluate → record.

Every run leaves exactly one record (bench/store.py): `running` when it starts, then `completed`, `diverged`
or `failed` (with the error). A completed cell is skipped on rerun unless `force=true`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import json
import logging
import random
import signal
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from bench.data import LengthGroupedBatchSampler
from bench.env import capture_env
from bench.models import load_model
from bench.store import RunStore
from bench.train import Diverged, Preempted, train
from bench.tuning import SEARCH_KEY, Pruned, TrialReporter, make_pruner, objective
from bench.trackers import NoTracker, SafeTracker, make_tracker
from bench.validate import ConfigError, validate_config  # noqa: F401  (ConfigError: re-exported, bench.run.ConfigError)
from bench.distributed import SINGLE, finish, join, launch, process_device, under_torchrun
from methods.base import Method, WrapContext
from tasks.base import Holdout, Task, model_inputs

log = logging.getLogger("bench")

SCHEMA = 1
# Keys that change where or how loudly a run reports, not what it computes: left out of the cell key (a claim's
# `claim:` node only says how to judge records, so `+claim=X` reuses the cells of the grid it names).
NON_SEMANTIC_KEYS = ("results_dir", "force", "progress", "tracker", "record", "export", "hydra", "claim")
# Nested keys left out too: how often a run saves itself and whether it also scores the pretrained model do not
# change its result, and the model's default target_modules reaches the result only through
# method.target_modules, which the key keeps.
# The tuning bookkeeping (which study, storage and trial id a trial reports to, whether it also measures sharpness,
# where a final run finds its study's summary) does not change the result either; tune.role does (what is scored).
NON_SEMANTIC_NESTED_KEYS = (("train", "checkpoint_every"), ("train", "eval_base"), ("model", "target_modules"),
                            ("tune", "study"), ("tune", "storage"), ("tune", "trial_id"), ("tune", "sharpness"),
                            ("tune", "effort_file"), ("tune", "window_file"), ("tune", "lr_reference"))
# Keys added after records existed, left out of the cell key while they hold the value every earlier run had, so
# adding a key never orphans a committed record; set to anything else, they enter the key like every other key.
# (group, key) -> that value. A key whose default changes the result must not be listed here.
KEYS_ADDED_LATER: dict[tuple[str, str], Any] = {("method", "store_bases"): False, ("train", "compile"): False,
                                                ("train", "strategy"): "single", ("train", "nproc"): 1,
                                                ("train", "init_from"): None, ("train", "lr_schedule"): "linear"}
#: Statuses that end a cell: a rerun skips it unless force=true (a pruned trial is a finished trial).
FINAL_STATUSES = ("completed", "pruned")
#: the method that reads a PEFT config file (its file's contents and training parameters enter the cell)
PEFT_CONFIG_TARGET = "methods.peft_config.PeftConfigMethod"
#: the task that merges member adapters (tasks/merge.py): its cells are named after their merger too
MERGE_TARGET = "tasks.merge.MergeTask"
#: the task that learns a sequence of tasks in turn (tasks/continual.py)
CONTINUAL_TARGET = "tasks.continual.ContinualTask"
#: composite tasks, whose cells are built from other cells: task target -> the recipe that runs one ("module:function")
UNLEARN_TARGET = "tasks.unlearn.UnlearnTask"
#: composite tasks: a cell that trains nothing itself, whose record a recipe builds from member cells
GENERATE_TARGET = "tasks.generate.GenerateTask"
COMPOSITE_RECIPES = {MERGE_TARGET: "bench.merge:run_merge", CONTINUAL_TARGET: "bench.continual:run_continual",
                     GENERATE_TARGET: "bench.generate:run_generate"}
CONF = Path(__file__).resolve().parents[1] / "conf"


def cell_names(cfg: DictConfig, choices: Any = None) -> dict[str, str]:
    """The option names of the cell (method, task, model): Hydra's choices, i.e. the YAML file names; a PEFT config
    run (method=peft) is named after its experiment, `peft/<tuner>/<variant>`, as PEFT's method comparison does; a merge
    cell after its merger, `merge/<members>/<merger>`, so that two mergers of one method are two rows, never seeds."""
    choices = HydraConfig.get().runtime.choices if choices is None else choices
    names = {group: str(choices[group]) for group in ("method", "task", "model")}
    if cfg.method.get("_target_") == PEFT_CONFIG_TARGET and cfg.method.get("config"):
        from methods.peft_config import experiment_name  # each PEFT config is its own method in the tables

        names["method"] = f"{names['method']}/{experiment_name(cfg.method.config)}"
    if cfg.task.get("_target_") == MERGE_TARGET:
        names["task"] = f"{names['task']}/{cfg.task.get('merger')}"
    return names


def run_id_of(names: dict[str, str], seed: int, key: str) -> str:
    """`<task>__<method>__<model>__s<seed>__<key[:8]>`, the option names' slashes turned into dashes."""
    return (f"{names['task'].replace('/', '-')}__{names['method'].replace('/', '-')}__{names['model']}__s{seed}__"
            f"{key[:8]}")


def semantic_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the keys that do not change a result (NON_SEMANTIC_KEYS and _NESTED_KEYS) and
    without the keys added later while they hold their earlier value (KEYS_ADDED_LATER).

    A method configured by a file (method=peft method.config=PATH) keys on the file's contents too, so that an
    edited adapter_config.json is a new cell rather than a skipped one.
    """
    plain = {k: cfg[k] for k in cfg if k not in NON_SEMANTIC_KEYS}  # hydra's own node is never resolved
    semantic = OmegaConf.to_container(OmegaConf.create(plain), resolve=True) if plain else {}
    for group, key in NON_SEMANTIC_NESTED_KEYS:
        if isinstance(semantic.get(group), dict):
            semantic[group] = {k: v for k, v in semantic[group].items() if k != key}
    for (group, key), earlier in KEYS_ADDED_LATER.items():
        node = semantic.get(group)
        if isinstance(node, dict) and key in node and node[key] == earlier:
            del node[key]
    method = semantic.get("method")
    if isinstance(method, dict) and method.get("_target_") == PEFT_CONFIG_TARGET:
        from methods.peft_config import config_digest

        try:
            method["config_digest"] = config_digest(method["config"])
        except FileNotFoundError:
            method["config_digest"] = None  # the run fails on the missing file, under the key of its path
    return semantic


def apply_training_params(cfg: DictConfig, overrides: list[str] | None = None) -> list[str]:
    """A PEFT experiment folder (method=peft method.config=DIR) brings its training_params.json: each parameter
    with a deltabench key (methods/peft_config.py TRAINING_KEYS) sets it, unless the command line (`overrides`;
    default the running app's) set that key, which wins. Returns the parameters that have no deltabench key (logged:
    the task, model and protocol own them)."""
    if cfg.method.get("_target_") != PEFT_CONFIG_TARGET or not cfg.method.get("config"):
        return []
    from methods.peft_config import training_overrides, training_params

    try:
        params = training_params(cfg.method.config)
        mapped, ignored = training_overrides(params)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"method.config={cfg.method.config}: {e}") from e
    given = {o.split("=", 1)[0].lstrip("+~") for o in (HydraConfig.get().overrides.task if overrides is None
                                                         else overrides)}
    for key, value in mapped.items():
        if key not in given:
            OmegaConf.update(cfg, key, value, force_add=False)
    return ignored


def cell_key(cfg: DictConfig, names: dict[str, str]) -> str:
    """A hash of everything that determines the result: the resolved config and the option names."""
    semantic = semantic_config(cfg)
    blob = json.dumps({"names": names, "config": semantic}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/config.yaml composed with `overrides`, outside a Hydra job (the tools that set runs up themselves:
    bench.steptime, bench.overhead, bench.catalogue)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None]:
    """`auto` picks CUDA, then MPS, then the CPU; precision `auto` is bf16 autocast where the GPU supports it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16; got {precision!r}")
    return dev, dtypes[precision]


def build(node: DictConfig, group: str, option: str) -> Any:
    """Instantiate conf/<group>/<option>.yaml, reporting a constructor's complaint with the option that caused it."""
    try:
        resolved = OmegaConf.to_container(node, resolve=True)
        resolved.pop(SEARCH_KEY, None)  # the method's search space is the tuning sweeper's, not a constructor argument
        return instantiate(resolved, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{group}={option}: {cause} (defaults in conf/{group}/{option}.yaml)") from cause


def compile_model(model: torch.nn.Module, method: Method, setting: Any, option: str) -> None:
    """torch.compile the model in place (its module and parameter names unchanged): true is inductor, a string names
    the backend. A method whose hooks defeat compilation (Method.compilable False) is refused with its reason."""
    if method.compilable is not True:
        raise ConfigError(f"method={option} cannot run under train.compile: {method.compilable}; set "
                          "train.compile=false")
    backend = "inductor" if setting is True else str(setting)
    model.compile(backend=backend)
    log.info("compiled the model with torch.compile(backend=%s)", backend)


def train_loader(task: Task, rows: list[Any], collate: Any, tcfg: DictConfig, seed: int) -> DataLoader:
    """Training batches in a seeded order: length-grouped (less padding) or plainly shuffled."""
    order = torch.Generator().manual_seed(seed)
    if tcfg.group_by_length:
        sampler = LengthGroupedBatchSampler([task.length(r) for r in rows], tcfg.batch_size, order)
        return DataLoader(rows, batch_sampler=sampler, collate_fn=collate, num_workers=tcfg.num_workers)
    return DataLoader(rows, batch_size=tcfg.batch_size, shuffle=True, generator=order, collate_fn=collate,
                      num_workers=tcfg.num_workers)


def calibration_batches(rows: list[Any], collate: Any, tcfg: DictConfig, seed: int,
                        device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The batches a data-dependent init sees: their own seeded shuffle, so the training order is the same for
    every method."""
    calibration = DataLoader(rows, batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate,
                             generator=torch.Generator().manual_seed(seed + 1))
    for _, batch in zip(range(tcfg.calibration_batches), calibration):
        yield {k: v.to(device) for k, v in batch.items()}


def tuning_block(cfg: DictConfig) -> dict[str, Any]:
    """What the record says of the tuning effort behind it: the protocol, the run's role, the tuned values of a
    trial, and for a reported (final) run its study's summary (trials by outcome, budget, chosen values and the
    validation score that chose them), copied from the file the sweeper wrote."""
    protocol = OmegaConf.to_container(cfg.protocol, resolve=True)
    block: dict[str, Any] = {"protocol": protocol["name"], "role": cfg.tune.role, "study": cfg.tune.study,
                             "budget": {"max_steps": int(cfg.train.max_steps), "batch_size": int(cfg.train.batch_size),
                                        "grad_accum": int(cfg.train.grad_accum)}}
    if cfg.tune.role == "trial":
        method = OmegaConf.to_container(cfg.method, resolve=True)
        keys = protocol.get("tune_keys") or list((method.get(SEARCH_KEY) or {}).keys())
        block["params"] = {k: method.get(k) for k in keys}
    if cfg.tune.role == "trial" and cfg.tune.get("window_file"):  # a sharpness-guided study's narrowed range
        block["lr_window"] = json.loads(Path(cfg.tune.window_file).read_text())
    if cfg.tune.role == "final" and cfg.tune.effort_file:
        block.update(json.loads(Path(cfg.tune.effort_file).read_text()))
    return block


def measure_sharpness(model: torch.nn.Module, method: Method, train_batches: Any, loss_fn: Any, n_batches: int,
                      seed: int) -> dict[str, Any]:
    """λ_max of the loss Hessian in the trainable parameters at init (bench/sharpness.py); no effect on training."""
    from bench.sharpness import top_hessian_eigenvalue

    batches = [b for _, b in zip(range(n_batches), train_batches())]
    return top_hessian_eigenvalue(model, method.trainable_parameters(model), batches, loss_fn, seed=seed).as_record()


def start_from(model: torch.nn.Module, method: Method, store: RunStore, run_id: str, head_modules: list[str],
               names: dict[str, str]) -> dict[str, Any]:
    """Load the trained tensors of a completed run of the same method and model into `model` (its task head
    excepted: each task keeps its own), so that training continues from them (a method that trains one adapter
    per task folds them away first: Method.continue_stage); W0 stays the pretrained weight, so this run's ΔW is the
    whole change since pretraining. Returns what the record says of it."""
    from safetensors.torch import load_file

    previous = store.read(run_id)
    if previous is None or previous.get("status") != "completed":
        raise ConfigError(f"train.init_from={run_id}: no completed run of that id in {store.root}; train it first "
                          "(a continual task, task=continual/..., trains its stages in order)")
    for group in ("method", "model"):
        if previous.get(group) != names[group]:
            raise ConfigError(f"train.init_from={run_id} is a {group}={previous.get(group)} run; this cell is "
                              f"{group}={names[group]}: a stage continues a run of its own method and model")
    path = store.run_dir(run_id) / "adapter.safetensors"
    if not path.is_file():
        raise ConfigError(f"train.init_from={run_id} has no adapter.safetensors; rerun it with "
                          "record.save_adapter=true force=true")
    saved = load_file(str(path))
    in_head = lambda n: any(f".{h}." in f".{n}" for h in head_modules)  # noqa: E731  (PEFT prefixes the names)
    loaded = 0
    with torch.no_grad():
        for name, p in method.saved_parameters(model).items():
            if name in saved and not in_head(name) and saved[name].shape == p.shape:
                p.copy_(saved[name].to(p.device, p.dtype))
                loaded += 1
    if loaded == 0:
        raise ConfigError(f"train.init_from={run_id}: none of its saved tensors fits this model's "
                          f"method={names['method']} parameters")
    stage = method.continue_stage(model)  # a method with one fresh adapter per task folds the loaded one away
    delta_path = store.run_dir(run_id) / "delta.safetensors"
    if method.mergeable and delta_path.is_file():  # the loaded model must be the one that run ended with
        before = load_file(str(delta_path))
        now_ = method.delta_weights(model)
        off = max((float((now_[n] - d).norm() / max(float(d.norm()), 1e-12)) for n, d in before.items()
                   if n in now_), default=0.0)
        if off > 1e-3:
            raise ConfigError(f"train.init_from={run_id}: method={names['method']} re-initialises its update "
                              f"before training (its ΔW is {off:.2g} off the run it starts from after loading), so "
                              "it cannot continue a stage; choose a method without a data-dependent init")
    return {"run_id": run_id, "task": previous.get("task"), "tensors": loaded, **stage}


def snapshot_steps(count: int, max_steps: int) -> list[int]:
    """`count` steps evenly spaced over the second half of training, the last one max_steps (a sorted list)."""
    if count <= 0:
        return []
    half = max_steps / 2
    return sorted({max(1, round(half + half * (k + 1) / count)) for k in range(count)})


def snapshots(method: Method, model: torch.nn.Module, run_dir: Path, count: int,
              max_steps: int) -> Callable[[int], None] | None:
    """record.snapshots=N: the trainable tensors at N steps of the second half of training (snapshot_steps), as
    <run dir>/snapshots/step_<step>.safetensors: the late-training checkpoints an adapter generator learns from
    (tasks/generate.py). None when N is 0."""
    steps = set(snapshot_steps(count, max_steps))
    if not steps:
        return None

    def save(step: int) -> None:
        if step in steps:
            (run_dir / "snapshots").mkdir(exist_ok=True)
            save_file_atomic({n: t.contiguous() for n, t in method.adapter_state_dict(model).items()},
                             run_dir / "snapshots" / f"step_{step:06d}.safetensors")

    return save


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file through a temporary file and a rename: two runs of one cell (two grids on one
    results dir) or a kill mid-write never leave a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one cell and return its record."""
    # ---------------------------------------------------------------- the cell and its record
    names = cell_names(cfg)
    if "suite" in cfg.task:
        raise ConfigError(f"task={names['task']} is a suite of {list(cfg.task.suite)}; "
                         f"run it as `python -m bench task={names['task']}` (it expands into one run per subtask)")
    ignored = apply_training_params(cfg)
    if ignored:
        log.info("method.config=%s: training parameters without a deltabench key (set by task, model or "
                 "protocol instead): %s", cfg.method.config, ", ".join(ignored))
    invalid: ConfigError | None = None
    try:  # every numeric key in its domain (bench/validate.py), before anything loads
        validate_config(cfg, names)
    except ConfigError as e:
        if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
            raise  # the run id holds the seed: no record can be named
        invalid = e  # the cell's record says failed, with this error, and nothing runs
    key = cell_key(cfg, names)
    run_id = run_id_of(names, cfg.seed, key)
    store = RunStore(Path(cfg.results_dir))
    previous = store.read(run_id)
    if invalid is not None and previous and previous["status"] in FINAL_STATUSES:
        raise invalid  # a finished cell's record is left as it is (only a non-semantic key can be wrong here)
    if previous and previous["status"] in FINAL_STATUSES and not cfg.force:
        log.info("skip %s: %s at %s (force=true reruns it)", run_id, previous["status"],
                 previous["timestamps"]["finished"])
        previous["skipped"] = True
        return previous
    strategy = str(cfg.train.get("strategy", "single"))
    if invalid is None and strategy != "single" and not under_torchrun():  # the cell's processes write its record
        return run_processes(cfg, store, run_id, int(cfg.train.get("nproc", 1)))
    dist = join(strategy, resolve_device(cfg.device, cfg.precision)[0]) if invalid is None else SINGLE  # NCCL or gloo
    record: dict[str, Any] = {
        "schema": SCHEMA, "id": run_id, "cell_key": key, "status": "running",
        **names, "suite": None, "seed": int(cfg.seed),
        "config": OmegaConf.to_container(cfg, resolve=True), "config_hash": key,
        "metrics": {}, "main_metric": None, "higher_is_better": {}, "eval_split": None, "eval_note": "",
        "curve": [], "eval_history": [], "params": {}, "cost": {}, "env": {}, "artifacts": {},
        "timestamps": {"created": now(), "started": now(), "finished": None},
        "attempts": (previous or {}).get("attempts", 0) + 1, "error": None,
        "attempt_token": uuid.uuid4().hex,  # tells this attempt's record from a concurrent run's of the same cell
        "tuning": tuning_block(cfg) if invalid is None else {"protocol": str(cfg.protocol.name),
                                                             "role": cfg.tune.role, "study": cfg.tune.study},
    }
    if dist.main:
        store.write(record)
    run_dir = store.run_dir(run_id)
    log.info("run %s -> %s", run_id, run_dir)

    tracker = SafeTracker(NoTracker())
    try:
        if invalid is not None:
            raise invalid
        # ------------------------------------------------------------ tracker (a mirror; the record stays the truth)
        if dist.main:  # a missing package fails here, before training
            tracker = make_tracker(cfg.get("tracker"), cfg.results_dir)
        tracker.start(run_id, record["config"], {**names, "seed": str(cfg.seed), "cell_key": key,
                                                 "attempt": str(record["attempts"])}, run_dir=run_dir)

        # ------------------------------------------------------------ setup
        seed_everything(cfg.seed)
        device, autocast_dtype = resolve_device(cfg.device, cfg.precision)
        device = process_device(dist, device)
        record["env"] = capture_env(device)
        task: Task = build(cfg.task, "task", names["task"])
        recipe = COMPOSITE_RECIPES.get(str(cfg.task.get("_target_")))
        if recipe is not None:  # a merge or continual cell trains nothing itself: its members are cells
            module, function = recipe.split(":")
            record.update(getattr(importlib.import_module(module), function)(
                cfg, task, store, device, autocast_dtype, list(HydraConfig.get().overrides.task)))
            record["status"] = "completed"
            return record  # `finally` writes it
        method: Method = build(cfg.method, "method", names["method"])
        if task.head.kind in method.unsupported_heads:  # before the model loads: the method cannot train this head
            raise ConfigError(f"method={names['method']} cannot train task={names['task']} (a {task.head.kind} "
                              f"model): {method.unsupported_heads[task.head.kind]}; choose another method or task")
        record.update(main_metric=task.main_metric, higher_is_better=dict(task.higher_is_better),
                      eval_split=task.eval_split, eval_note=task.eval_note, suite=task.suite)
        task.run_dir = run_dir  # where evaluate() may leave artifacts (generated images) beside the record
        role = cfg.tune.role
        if cfg.protocol.get("validation"):  # every run of a tuning protocol trains without its validation holdout
            task.holdout = Holdout(**cfg.protocol.validation)
        loaded = load_model(cfg.model, task.head)
        collate = task.collate_fn(loaded.tokenizer)
        train_rows = task.examples("train", seed=cfg.seed)
        # a trial (or a sharpness probe) never sees the eval split
        eval_rows = task.examples("validation" if role in ("trial", "probe") else "eval")
        if role == "trial":
            record.update(eval_split="validation", eval_note=(
                f"tuning trial: scored on {len(eval_rows)} rows held out from train "
                f"(protocol {cfg.protocol.name}, seed {cfg.protocol.validation.seed})"))
        record["chance"] = task.chance(eval_rows)  # the floor of the split it is scored on (majority class, ...)
        loader = train_loader(task, train_rows, collate, cfg.train, int(cfg.seed))
        eval_rows = sorted(eval_rows, key=task.length)  # less padding; metrics do not depend on the order
        eval_loader = DataLoader(eval_rows, batch_size=cfg.train.eval_batch_size,
                                 collate_fn=task.eval_collate_fn(loaded.tokenizer))

        # ------------------------------------------------------------ wrap + calibrate
        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            return task.evaluate(m, eval_loader, device, autocast_dtype)

        def task_loss(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
            return task.objective(m, b).loss  # the model's own loss unless the task has an objective (unlearning)

        def train_batches() -> Iterator[dict[str, torch.Tensor]]:
            for batch in train_loader(task, train_rows, collate, cfg.train, int(cfg.seed) + 2):
                yield {k: v.to(device) for k, v in batch.items()}

        taught: dict[str, float] = {}
        if str(cfg.task.get("_target_")) == UNLEARN_TARGET:  # unlearning starts from a model taught the facts
            from bench.unlearn import start_taught

            if cfg.export:
                raise ConfigError(f"export=true: an unlearning run's adapter applies to its taught model, not to "
                                  f"model={names['model']}'s weights, so it has no PEFT export; leave export off")

            record["taught"], taught = start_taught(cfg, task, store, loaded.model.to(device), loaded.head_modules,
                                                    evaluate, list(HydraConfig.get().overrides.task))
        probe_base = task.forgetting_probe(loaded.model.to(device), device, autocast_dtype)  # {} for most tasks
        pretrained = evaluate(loaded.model) if cfg.train.get("eval_base") and role not in ("trial", "probe") else {}
        ctx = WrapContext(head_modules=loaded.head_modules, seed=int(cfg.seed), evaluate=evaluate,
                          main_metric=task.main_metric, train_batches=train_batches, loss_fn=task_loss,
                          max_steps=int(cfg.train.max_steps))
        total_base = sum(p.numel() for p in loaded.model.parameters())
        setup_t0 = time.perf_counter()  # wrapping and the method's data-dependent setup (calibrate): cost.setup_s
        try:
            model = method.prepare(loaded.model, ctx).to(device)
        except (ValueError, TypeError) as e:  # target_modules that match nothing or a layer the method cannot wrap
            if isinstance(e, TypeError) and "method." not in str(e):
                raise  # a TypeError that names no key to fix is a bug, not a configuration problem
            raise ConfigError(f"method={names['method']}: {e}") from e
        method.calibrate(model, calibration_batches(train_rows, collate, cfg.train, int(cfg.seed), device), task_loss)
        setup_s = time.perf_counter() - setup_t0  # PELA's distillation, LoRA-GA's gradients, PiSSA's SVD, ...
        if cfg.train.get("init_from"):  # a continual-learning stage: the previous stage's trained tensors, head aside
            record["init_from"] = start_from(model, method, store, str(cfg.train.init_from), loaded.head_modules,
                                             names)
        if cfg.train.get("compile"):
            compile_model(model, method, cfg.train.compile, names["method"])
        if role == "probe" or (role == "trial" and cfg.tune.sharpness and cfg.protocol.get("sharpness_batches")):
            record["tuning"]["sharpness"] = measure_sharpness(model, method, train_batches, task_loss,
                                                              max(int(cfg.protocol.get("sharpness_batches") or 0), 1),
                                                              int(cfg.seed))
        if role == "probe":  # a sharpness-guided study's probe: λ_max at init is its result; nothing trains
            record.update(status="completed", eval_split=None, params={
                "trainable": sum(p.numel() for p in method.trainable_parameters(model).values()),
                "total": total_base, "model_source": loaded.source})
            return record  # `finally` writes it

        # ------------------------------------------------------------ train
        checkpoint = run_dir / "checkpoint.pt"
        if cfg.force:
            checkpoint.unlink(missing_ok=True)  # a forced rerun starts from scratch
        elif checkpoint.exists():
            log.info("resuming %s from %s", run_id, checkpoint)
        tcfg, reporter = cfg.train, None
        higher = task.higher_is_better.get(task.main_metric, True)  # the direction a study optimises
        if role == "trial":  # validation scores every prune_every steps feed the study's pruner
            tcfg = OmegaConf.merge(cfg.train, {"eval_every": int(cfg.protocol.prune_every)})
            reporter = TrialReporter(cfg.tune.storage, cfg.tune.study, cfg.tune.trial_id, task.main_metric,
                                     higher,
                                     make_pruner(OmegaConf.to_container(cfg.protocol), int(cfg.train.max_steps)))
        result = train(model, method, loader, tcfg, device, autocast_dtype, evaluate,
                       progress=cfg.progress, desc=run_id, checkpoint=checkpoint, on_log=tracker.on_log,
                       on_eval=reporter, dist=dist, objective=task.objective,
                       on_step=snapshots(method, model, run_dir, int(cfg.record.get("snapshots") or 0),
                                         int(cfg.train.max_steps)))
        record.update(curve=result.curve, eval_history=result.eval_history, resumed_from=result.resumed_from)
        if not dist.main:  # rank 0 evaluates, post-trains, exports and records
            return record

        # ------------------------------------------------------------ post-train + evaluate
        # what training updated, counted before post_train (compression methods swap the trained adapter for another)
        trained = sum(p.numel() for p in method.trainable_parameters(model).values())
        post = method.post_train(model, ctx)  # compensation, pruning: the final evaluation scores its result
        t0 = time.perf_counter()
        metrics = evaluate(model)
        eval_s = time.perf_counter() - t0
        metrics.update(post)
        if getattr(task, "samples", None):  # a few generations with their extracted answers, to read by eye
            record["samples"] = list(task.samples)
        metrics.update({f"pretrained/{name}": value for name, value in pretrained.items()})
        metrics.update({f"taught/{name}": value for name, value in taught.items()})  # unlearning's "before"
        if probe_base:  # forgetting: loss on general text before and after fine-tuning
            probe = task.forgetting_probe(model, device, autocast_dtype)
            for name, before in probe_base.items():
                metrics.update({f"{name}_base": before, name: probe[name], f"{name}_increase": probe[name] - before})
                record["higher_is_better"].update({f"{name}_base": False, name: False, f"{name}_increase": False})
        log.info("%s: %s", run_id, metrics)
        if reporter is not None:
            record["tuning"].update(objective=objective(metrics, task.main_metric, higher),
                                    intermediate=reporter.values)

        # ------------------------------------------------------------ artifacts + record
        adapter = method.adapter_state_dict(model)
        adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
        if cfg.record.save_adapter:
            save_file_atomic(adapter, run_dir / "adapter.safetensors")
            record["artifacts"]["adapter"] = "adapter.safetensors"
        if cfg.record.save_delta and method.mergeable:  # an input-dependent update has no ΔW
            deltas = {name: d.contiguous() for name, d in method.delta_weights(model).items()}
            save_file_atomic(deltas, run_dir / "delta.safetensors")
            record["artifacts"]["delta"] = "delta.safetensors"
        if cfg.export:
            from bench.export import export  # PEFT's import takes seconds: only runs that export pay for it

            seed_everything(cfg.seed)
            fresh = load_model(cfg.model, task.head).model
            check = model_inputs(collate(train_rows[:cfg.train.eval_batch_size]))  # model(**check) runs
            card = {**record, "metrics": metrics, "params": {"model_source": loaded.source}}  # README.md's facts
            exported = export(model.to("cpu"), method, fresh, ctx, check, run_dir / "export",
                              base_model_id=str(cfg.model.get("id") or "") or None, card=card)
            record["artifacts"]["export"] = {"kind": exported.kind, "path": "export", "reason": exported.reason,
                                             "max_abs_diff": exported.max_abs_diff, "ranks": exported.ranks}
            log.info("exported %s to %s (%s)", exported.kind, exported.path, exported.reason or "exact")
        record.update(
            status="completed",
            metrics=metrics,
            params={"trainable": trained, "total": total_base,
                    "adapter_bytes": adapter_bytes, "model_source": loaded.source},
            cost={"train_s": result.train_s, "setup_s": setup_s, "step_s": result.median_step_s,
                  "tokens_per_s": result.tokens / result.train_s if result.train_s else None,
                  "eval_s": eval_s, "peak_mem_bytes": result.peak_mem_bytes,
                  "peak_mem_kind": result.peak_mem_kind, "optimizer_state_bytes": result.optimizer_state_bytes,
                  "device": str(device),
                  "precision": str(autocast_dtype or "fp32"), "steps": len(result.step_times),
                  "loadavg_1m_end": os.getloadavg()[0]},
        )
    except Preempted as e:
        record.update(status="preempted", error={"type": "Preempted", "message": str(e), "step": e.step})
        log.warning("%s preempted: %s", run_id, e)
        if dist.main:
            write_unless_finished_elsewhere(store, record)
            tracker.finish(record)  # the signal may end the process before `finally`
        signal.raise_signal(e.signum)  # pass it on: SLURM/submitit requeue, or the default termination
    except Pruned as e:
        keep_partial_curve(record, e)
        record["tuning"].update(intermediate=reporter.values if reporter else {}, objective=None)
        record.update(status="pruned", error={"type": "Pruned", "message": str(e), "step": e.step})
        log.info("%s %s", run_id, e)
    except Diverged as e:
        keep_partial_curve(record, e)
        record.update(status="diverged", error={"type": "Diverged", "message": str(e), "step": e.step,
                                                 "traceback": traceback.format_exc(limit=-8)})
        log.error("%s diverged: %s", run_id, e)
    except BaseException as e:
        e.run_id = run_id  # type: ignore[attr-defined]  # lets a grid summary name the record
        record.update(status="failed", error={"type": type(e).__name__, "message": str(e),
                                              "traceback": traceback.format_exc(limit=-8)})
        raise
    finally:
        record["timestamps"]["finished"] = now()
        if dist.main:
            write_unless_finished_elsewhere(store, record)
            tracker.finish(record)  # after the record is written: it never waits on, or depends on, a tracker
        finish(dist)
    return record


def run_processes(cfg: DictConfig, store: RunStore, run_id: str, nproc: int) -> dict[str, Any]:
    """The cell under torchrun with `nproc` processes (bench/distributed.py); returns the record rank 0 wrote."""
    hc = HydraConfig.get()
    log.info("run %s with %d processes (train.strategy=%s)", run_id, nproc, cfg.train.strategy)
    code = launch(list(hc.overrides.task), nproc, hc.runtime.output_dir)
    record = store.read(run_id)
    if record is None:
        raise RuntimeError(f"{run_id}: torchrun exited with status {code} before rank 0 wrote a record; see "
                           f"{hc.runtime.output_dir}/rank*/ for each process's log")
    if code != 0 and record.get("status") in ("running", None):  # a process died without its record saying why
        record.update(status="failed", error={"type": "ProcessFailed", "message": (
            f"torchrun exited with status {code}; see {hc.runtime.output_dir}/rank*/ for each process's log")})
        store.write(record)
    return record


def keep_partial_curve(record: dict[str, Any], e: BaseException) -> None:
    """A run stopped mid-training (pruned, diverged) keeps its loss curve and evaluations up to that step
    (bench.train attaches them to the exception as `train_result`)."""
    partial = getattr(e, "train_result", None)
    if partial is not None:
        record.update(curve=partial.curve, eval_history=partial.eval_history)


def write_unless_finished_elsewhere(store: RunStore, record: dict[str, Any]) -> None:
    """Write the record, except an unfinished one (failed, diverged, preempted) over a record that another process
    running the same cell at the same time (two grids on one results dir) has finished meanwhile."""
    if record["status"] not in FINAL_STATUSES:
        current = store.read(record["id"])
        if (current and current.get("status") in FINAL_STATUSES
                and current.get("attempt_token") != record.get("attempt_token")):
            log.warning("%s: %s here, but another run of this cell finished it meanwhile; its %s record is kept",
                        record["id"], record["status"], current["status"])
            return
    store.write(record)

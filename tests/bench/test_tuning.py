"""The tuning protocol: validation holdout, equal trials per method, pruning, resume of a killed study."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from bench.tuning import (
    Pruned,
    TrialReporter,
    TuningError,
    check_protocol,
    grid,
    grid_order,
    rebuild_study,
    search_space,
)
from tasks.base import Holdout
from tasks.glue import GlueTask

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = {"name": "t", "trials": 2, "sampler": "grid", "grid_points": 2, "sampler_seed": 0, "seeds": [0, 1]}


# ------------------------------------------------------------------------------------------------ the holdout
@pytest.mark.parametrize("subtask", ["sst2", "mrpc", "cola", "mnli"])
def test_no_reported_or_training_row_is_ever_a_validation_row(subtask):
    task = GlueTask(subtask, max_train_samples=2000)
    task.holdout = Holdout(size=300, seed=1234)
    val = task.examples("validation")
    ids = {id(r) for r in val}
    assert len(val) == min(300, int(0.2 * len(GlueTask(subtask).examples("train"))))
    for seed in (0, 1, 7):  # whatever the run seed, training never draws a validation row
        train = task.examples("train", seed=seed)
        assert len(train) == 2000 and not ids & {id(r) for r in train}
    evals = task.examples("eval")  # the reported split: a different file (MNLI: rows held out from train)
    assert not ids & {id(r) for r in evals}
    assert not {(r.text_a, r.text_b, r.label) for r in val} & {(r.text_a, r.text_b, r.label) for r in evals} or \
        subtask in ("sst2", "cola")  # short phrases recur across GLUE files; MRPC/MNLI pairs must not
    again = GlueTask(subtask)
    again.holdout = Holdout(size=300, seed=1234)
    assert [id(r) for r in again.examples("validation")] == [id(r) for r in val]  # fixed by its own seed alone


def test_without_a_protocol_there_is_no_validation_split():
    with pytest.raises(ValueError, match="protocol=cheap"):
        GlueTask("sst2").examples("validation")


def test_holdout_is_capped_by_its_fraction():
    assert len(Holdout(size=500, seed=0, max_fraction=0.1).indices(1000)) == 100
    with pytest.raises(ValueError, match="too small"):
        Holdout(size=5, seed=0).indices(4)


# ------------------------------------------------------------------------------------------------ spaces
def test_search_space_and_grid_hold_the_default():
    space = search_space({"lr": 1e-3, "r": 8, "search": {"lr": {"low": 1e-4, "high": 3.162e-3, "log": True},
                                                         "r": {"choices": [4, 8]}}}, None, "lora")
    assert space["lr"] == FloatDistribution(1e-4, 3.162e-3, log=True)
    assert space["r"] == CategoricalDistribution([4, 8])
    assert grid(space, 4) == {"lr": [1e-4, 3.16e-4, 1e-3, 3.16e-3], "r": [4, 8]}
    order = grid_order({**PROTOCOL, "grid_points": 4}, space)
    assert len(order) == 8 and len({json.dumps(p, sort_keys=True) for p in order}) == 8
    assert order == grid_order({**PROTOCOL, "grid_points": 4}, space)  # seeded


def test_bad_spaces_and_protocols_name_the_fix():
    with pytest.raises(TuningError, match="no `search:` block"):
        search_space({"lr": 1e-3}, None, "x")
    with pytest.raises(TuningError, match="lacks"):
        search_space({"lr": 1e-3, "search": {"lr": {"low": 1e-4, "high": 1e-2}}}, ["r"], "x")
    with pytest.raises(TuningError, match="low < high"):
        search_space({"lr": 1e-3, "search": {"lr": {"low": 0.0, "high": 1e-2, "log": True}}}, None, "x")
    space = search_space({"lr": 1e-3, "search": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}, None, "x")
    with pytest.raises(TuningError, match="grid_points"):
        check_protocol({**PROTOCOL, "trials": 3}, space, "x")


def test_every_method_yaml_declares_a_tunable_lr():
    from omegaconf import OmegaConf

    from tests.helpers import compose_cfg

    for path in sorted((ROOT / "conf" / "method").glob("*.yaml")):
        cfg = compose_cfg([f"method={path.stem}"])
        space = search_space(OmegaConf.to_container(cfg.method, resolve=True), ["lr"], path.stem)
        low, high = space["lr"].low, space["lr"].high
        assert space["lr"].log and (low < cfg.method.lr < high or math.isclose(cfg.method.lr, high)), path.stem


# ------------------------------------------------------------------------------------------------ pruning
def test_trial_reporter_prunes_below_the_median(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    space = {"lr": FloatDistribution(1e-4, 1e-2, log=True)}
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, distributions=space, value=0.9,
                                              intermediate_values={2: 0.9}))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1)
    good = study.ask(space)
    TrialReporter(storage, "s", good._trial_id, "accuracy", True, pruner)(2, {"accuracy": 0.95})  # above: goes on
    bad = study.ask(space)
    reporter = TrialReporter(storage, "s", bad._trial_id, "accuracy", True, pruner)
    with pytest.raises(Pruned, match="step 2"):
        reporter(2, {"accuracy": 0.1})
    assert reporter.values == {2: 0.1}
    lower = TrialReporter(None, None, None, "loss", False)  # lower is better: the objective is negated
    lower(4, {"loss": 0.25})
    assert lower.values == {4: -0.25}


def test_rebuilt_study_skips_running_and_foreign_trials(tmp_path):
    space = {"lr": FloatDistribution(1e-4, 1e-2, log=True)}

    def rec(i, status, lr, obj=None):
        return {"id": f"r{i}", "status": status, "timestamps": {"created": f"2026-01-0{i}"},
                "tuning": {"params": {"lr": lr}, "objective": obj, "intermediate": {"50": 0.5}}}

    records = [rec(1, "completed", 1e-3, 0.8), rec(2, "pruned", 1e-4), rec(3, "diverged", 1e-2),
               rec(4, "running", 3e-3), rec(5, "completed", 0.5, 0.99)]  # lr=0.5: outside today's space
    study = rebuild_study(f"sqlite:///{tmp_path / 's.db'}", "s", records, space, optuna.pruners.NopPruner())
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    assert study.best_value == 0.8 and study.get_trials()[1].intermediate_values == {50: 0.5}


# ------------------------------------------------------------------------------------------------ the sweep
def sweep(results: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", "-m", "hydra/sweeper=tune", "hydra/launcher=basic", "protocol=cheap",
         "+experiment=smoke", "model=tiny_bert", f"results_dir={results}", "protocol.trials=2",
         "protocol.grid_points=2", "protocol.seeds=[0,1]", "protocol.prune_every=2", "protocol.validation.size=16",
         "protocol.sharpness_batches=1", "task.max_eval_samples=16", "record.save_delta=false", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900)


def all_records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*/record.json"))]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    results = tmp_path_factory.mktemp("tuned")
    out = sweep(results, "method=lora,vera")
    assert out.returncode == 0, out.stderr[-3000:]
    return results, out


def test_every_method_gets_the_same_trials_and_only_finals_are_reported(swept):
    results, out = swept
    records = all_records(results)
    for method in ("lora", "vera"):
        mine = [r for r in records if r["method"] == method]
        trials = [r for r in mine if r["tuning"]["role"] == "trial"]
        finals = [r for r in mine if r["tuning"]["role"] == "final"]
        assert len(trials) == 2 and len({json.dumps(t["tuning"]["params"]) for t in trials}) == 2
        assert all(t["eval_split"] == "validation" and t["seed"] == 0 for t in trials)
        assert sorted(f["seed"] for f in finals) == [0, 1] and all(f["eval_split"] == "dev" for f in finals)
        effort = finals[0]["tuning"]
        assert effort["trials"]["total"] == 2 and effort["protocol"] == "cheap"
        assert effort["budget"] == {"max_steps": 6, "batch_size": 8, "grad_accum": 1}
        completed = [t for t in trials if t["status"] == "completed"]
        best = max(completed, key=lambda t: t["tuning"]["objective"])
        assert effort["chosen"] == best["tuning"]["params"] == {"lr": finals[0]["config"]["method"]["lr"]}
        assert effort["val_objective"] == best["tuning"]["objective"]
        assert sum(bool(t["tuning"].get("sharpness")) for t in trials) == 1  # measured once per study, at init
        assert math.isfinite(effort["sharpness"]["lambda_max"])


def test_a_killed_study_resumes_where_it_stopped(swept, tmp_path):
    results, _ = swept
    copy = tmp_path / "copy"
    (copy / "runs").mkdir(parents=True)
    records = all_records(results)
    lora = [r for r in records if r["method"] == "lora"]
    trials = sorted((r for r in lora if r["tuning"]["role"] == "trial"), key=lambda r: r["timestamps"]["created"])
    killed = dict(trials[-1], status="running")  # the sweep died while its last trial ran; no final yet
    for r in [trials[0], killed]:
        (copy / "runs" / r["id"]).mkdir()
        (copy / "runs" / r["id"] / "record.json").write_text(json.dumps(r))
    out = sweep(copy, "method=lora")
    assert out.returncode == 0, out.stderr[-3000:]
    after = {r["id"]: r for r in all_records(copy)}
    assert after[trials[0]["id"]]["attempts"] == 1  # the finished trial was not rerun
    assert after[killed["id"]]["status"] in ("completed", "pruned") and after[killed["id"]]["attempts"] == 2
    assert sum(r["tuning"]["role"] == "trial" for r in after.values()) == 2  # the same trial, not a third one
    finals = sorted((r for r in after.values() if r["tuning"]["role"] == "final"), key=lambda r: r["seed"])
    before = sorted((r for r in lora if r["tuning"]["role"] == "final"), key=lambda r: r["seed"])
    assert [f["id"] for f in finals] == [f["id"] for f in before]  # the same choice, the same reported cells
    assert [f["metrics"] for f in finals] == [f["metrics"] for f in before]


def test_a_sweep_without_a_protocol_or_with_seeds_names_the_fix(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", "-m", "hydra/sweeper=tune", "+experiment=smoke",
                          "model=tiny_bert", f"results_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "protocol=cheap" in out.stderr
    out = sweep(tmp_path, "method=lora", "seed=0,1")
    assert out.returncode != 0 and "protocol.seeds" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_a_pruned_trial_leaves_a_pruned_record_and_is_not_rerun(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    space = {"lr": FloatDistribution(1e-4, 1e-2, log=True)}
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-4}, distributions=space, value=2.0,
                                              intermediate_values={2: 2.0}))  # unbeatable: any trial is below it
    trial = study.ask(space)
    args = [sys.executable, "-m", "bench", "protocol=cheap", "+experiment=smoke", "model=tiny_bert",
            f"results_dir={tmp_path}", "protocol.prune_every=2", "protocol.pruner_startup_trials=1",
            "protocol.validation.size=16", "method.lr=0.001", "tune.role=trial", "tune.study=s",
            f"tune.storage={storage}", f"tune.trial_id={trial._trial_id}", "record.save_delta=false"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = all_records(tmp_path)
    assert record["status"] == "pruned" and record["error"]["step"] == 2
    assert list(record["tuning"]["intermediate"]) == ["2"] and record["eval_split"] == "validation"
    assert [e["step"] for e in record["eval_history"]] == [2] and not (tmp_path / "runs" / record["id"] /
                                                                       "checkpoint.pt").exists()
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "pruned at" in again.stdout + again.stderr
    assert all_records(tmp_path)[0]["attempts"] == 1


# ------------------------------------------------------------------------------------------------ sharpness as a guide
def reference_records(tmp: Path, line: tuple[float, float] = (-1.0, -3.0), model: str = "tiny_bert") -> Path:
    """Five methods' reported runs whose (λ_max, tuned lr) lie on log10 lr = intercept + slope · log10 λ."""
    slope, intercept = line
    for i, lam in enumerate([0.5, 1.0, 2.0, 4.0, 8.0]):
        run = tmp / "runs" / f"r{i}"
        run.mkdir(parents=True)
        lr = 10 ** (intercept + slope * math.log10(lam))
        run.joinpath("record.json").write_text(json.dumps({
            "id": f"r{i}", "model": model, "task": "glue/sst2", "method": f"m{i}", "status": "completed",
            "tuning": {"role": "final", "chosen": {"lr": lr}, "sharpness": {"lambda_max": lam}}}))
    return tmp


def test_the_sharpness_fit_recovers_a_known_line_and_leaves_the_method_out(tmp_path):
    from analysis.records import load_records
    from bench.tuning import fit_sharpness, lr_window, narrowed, tuned_lr_points

    points = tuned_lr_points(load_records(reference_records(tmp_path)), "tiny_bert")
    assert len(points) == 5 and tuned_lr_points(load_records(tmp_path), "minilm") == []
    fit = fit_sharpness(points, leave_out="lora")
    assert fit.slope == pytest.approx(-1.0) and fit.intercept == pytest.approx(-3.0) and fit.residual_sd < 1e-9
    assert fit.guess(2.0) == pytest.approx(5e-4)
    with pytest.raises(TuningError, match="tune.lr_reference"):  # m0 left out: 4 methods are too few for a guess
        fit_sharpness(points, leave_out="m0")
    window = lr_window(fit, {"lambda_max": 2.0}, span=0.5)
    assert window["low"] == float(f"{5e-4 * 10 ** -0.25:.3g}") and window["high"] == float(f"{5e-4 * 10 ** 0.25:.3g}")
    assert grid(narrowed({"lr": FloatDistribution(1e-5, 1e-1, log=True)}, window), 2)["lr"] == \
        [window["low"], window["high"]]  # a 2-point grid visits the window's ends, inside its distribution
    with pytest.raises(TuningError, match="protocol=cheap"):
        lr_window(fit, {"lambda_max": -0.3}, span=0.5)  # a negative dominant eigenvalue gives no guess


def test_a_guided_study_probes_once_searches_its_window_and_resumes(tmp_path):
    reference = reference_records(tmp_path / "reference")
    results = tmp_path / "guided"
    args = ["method=lora", "protocol=sharp", f"tune.lr_reference={reference}"]
    out = sweep(results, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    records = all_records(results)
    probes = [r for r in records if r["tuning"]["role"] == "probe"]
    trials = [r for r in records if r["tuning"]["role"] == "trial"]
    finals = [r for r in records if r["tuning"]["role"] == "final"]
    assert len(probes) == 1 and probes[0]["status"] == "completed" and not probes[0]["curve"]  # measured, not trained
    window = trials[0]["tuning"]["lr_window"]
    assert window["lambda_max"] == probes[0]["tuning"]["sharpness"]["lambda_max"]
    assert window["fit"]["n"] == 5 and window["guess"] == pytest.approx(
        10 ** (-3.0 - math.log10(window["lambda_max"])))
    assert sorted(t["tuning"]["params"]["lr"] for t in trials) == [window["low"], window["high"]]
    assert len(finals) == 2 and all(f["tuning"]["lr_window"] == window for f in finals)
    assert finals[0]["tuning"]["protocol"] == "sharp" and finals[0]["tuning"]["trials"]["total"] == 2
    from analysis.leaderboard import load_leaderboard

    board = load_leaderboard(results)
    assert board.probe_records == 1 and board.trial_records == 2  # the probe is never a reported row
    (reference / "runs" / "r0").rename(reference / "gone")  # the fit changes; the study keeps its first window
    again = sweep(results, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {r["id"]: r["attempts"] for r in all_records(results)} == {r["id"]: 1 for r in records}

"""Paper claims (analysis/claims.py, conf/claim/*.yaml): every rule kind on constructed records with a known answer
(holds -> reproduced, fails -> not reproduced, inside the noise -> inconclusive), the claim files themselves, and the
CLI on a temporary results root."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from analysis.claims import (
    CLAIM_DIR,
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    RULES,
    Check,
    RecordPool,
    claim_problems,
    combine,
    evaluate_claim,
    evaluate_rule,
    known_methods,
    leaves,
    load_claim,
    load_claims,
    write_claims_report,
)
from tests.analysis.test_leaderboard import TRAINABLE
from tests.analysis.test_tuned_leaderboard import tuned

REPO = Path(__file__).resolve().parents[2]
TRAINABLE.update(strong=1000, weak=300_000, twin=200_000, comp=338_690, dyn=338_690, gated=338_690)

CLAIM_NAMES = sorted(p.stem for p in CLAIM_DIR.glob("*.yaml"))


# ---------------------------------------------------------------------------------------------- construction


def run(method: str, seed: int, score: float, role: str = "final", **fields: Any) -> dict[str, Any]:
    """A reported (or trial) record of the cheap protocol on SST-2, with extra metrics, params, cost or a curve."""
    record = tuned(method, seed, score, role=role)
    record["metrics"].update(fields.pop("metrics", {}))
    record["params"].update(fields.pop("params", {}))
    record["cost"].update(fields.pop("cost", {}))
    if "curve" in fields:
        record["curve"] = [{"step": s, "loss": v} for s, v in fields.pop("curve")]
    record.update(fields)
    return record


def runs(method: str, scores: list[float], **per_seed: list[Any]) -> list[dict[str, Any]]:
    """One record per seed; each keyword is a list with one value per seed (metrics=[{...}, ...], ...)."""
    return [run(method, s, score, **{k: v[s] for k, v in per_seed.items()}) for s, score in enumerate(scores)]


def write_claim(conf: Path, name: str, claim: dict[str, Any], methods: str, results_dir: str = "results/zoo",
                tasks: str = "glue/sst2") -> Path:
    conf.mkdir(parents=True, exist_ok=True)
    node = {"defaults": [{"override /protocol": "cheap"}], "results_dir": results_dir,
            "hydra": {"sweeper": {"params": {"method": methods, "task": tasks, "model": "minilm"}}},
            "claim": {"paper": "2106.09685", "statement": "s", "setting": "s", **claim}}
    path = conf / f"{name}.yaml"
    path.write_text("# @package _global_\n" + OmegaConf.to_yaml(OmegaConf.create(node)))
    return path


def write_records(root: Path, records: list[dict[str, Any]], results_dir: str = "results/zoo") -> None:
    for r in records:
        run_dir = root / results_dir / "runs" / r["id"]
        run_dir.mkdir(parents=True)
        (run_dir / "record.json").write_text(json.dumps(r))


def verdict_of(tmp_path: Path, claim: dict[str, Any], records: list[dict[str, Any]], methods: str = "m,lora") -> Any:
    write_records(tmp_path, records)
    path = write_claim(tmp_path / "conf", "c", claim, methods)
    return evaluate_claim(load_claim(path), RecordPool(tmp_path))


LORA = [0.850, 0.860, 0.855]  # LoRA's scores over three seeds (s.d. 0.005)


# ---------------------------------------------------------------------------------------------- each rule kind


CASES = {
    # better: the method's mean above the reference's with Welch's interval excluding 0
    "better holds": ({"rule": "better"}, runs("strong", [0.950, 0.951, 0.949]), REPRODUCED),
    "better fails": ({"rule": "better"}, runs("strong", [0.700, 0.705, 0.695]), NOT_REPRODUCED),
    "better noise": ({"rule": "better"}, runs("strong", [0.840, 0.880, 0.860]), INCONCLUSIVE),
    # not_worse: the interval's lower end above -margin
    "not_worse holds": ({"rule": "not_worse", "margin": 0.02}, runs("twin", [0.852, 0.858, 0.856]), REPRODUCED),
    "not_worse fails": ({"rule": "not_worse", "margin": 0.02}, runs("twin", [0.700, 0.705, 0.695]), NOT_REPRODUCED),
    "not_worse noise": ({"rule": "not_worse", "margin": 0.02}, runs("twin", [0.800, 0.860, 0.830]), INCONCLUSIVE),
    # less, deterministic (params.trainable): exact, one record per side decides it
    "less holds": ({"quantity": "params.trainable", "rule": "less", "factor": 0.1}, runs("strong", LORA),
                   REPRODUCED),
    "less fails": ({"quantity": "params.trainable", "rule": "less", "factor": 0.1}, runs("weak", LORA),
                   NOT_REPRODUCED),
    # less, seeded against a constant (SoRA's gate density vs LoRA's 1): a one-sample interval
    "less noise": ({"quantity": "metrics.density", "rule": "less", "factor": 0.9, "reference_value": 1.0},
                   runs("gated", LORA, metrics=[{"density": 0.80}, {"density": 0.95}, {"density": 0.90}]),
                   INCONCLUSIVE),
    "less seeded holds": ({"quantity": "metrics.density", "rule": "less", "factor": 0.9, "reference_value": 1.0},
                          runs("gated", LORA, metrics=[{"density": 0.50}, {"density": 0.52}, {"density": 0.49}]),
                          REPRODUCED),
    # within: reference/factor <= method <= factor x reference
    "within holds": ({"quantity": "params.trainable", "rule": "within", "factor": 2.0}, runs("twin", LORA),
                     REPRODUCED),
    "within fails": ({"quantity": "params.trainable", "rule": "within", "factor": 2.0}, runs("strong", LORA),
                     NOT_REPRODUCED),
    "within noise": ({"quantity": "cost.step_s", "rule": "within", "factor": 1.5},
                     runs("twin", LORA, cost=[{"step_s": 0.2}, {"step_s": 0.6}, {"step_s": 0.4}]), INCONCLUSIVE),
    # curves: lower training loss is better
    "curve holds": ({"quantity": "curve_area", "until": 20, "rule": "better"},
                    runs("strong", LORA, curve=[[(1, 0.69), (10, 0.40), (20, 0.30), (30, 0.9)]] * 3), REPRODUCED),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_each_rule_kind_has_a_known_answer(tmp_path: Path, case: str) -> None:
    claim, records, expected = CASES[case]
    method = records[0]["method"]
    reference = runs("lora", LORA, curve=[[(1, 0.69), (10, 0.60), (20, 0.55), (30, 0.2)],
                                          [(1, 0.69), (10, 0.61), (20, 0.56), (30, 0.2)],
                                          [(1, 0.69), (10, 0.59), (20, 0.54), (30, 0.2)]])
    result = verdict_of(tmp_path, {"method": method, "reference": "lora", "quantity": "metric", **claim},
                        records + reference, methods=f"{method},lora")
    assert result.verdict == expected, result.checks
    if expected == INCONCLUSIVE:
        assert "straddles" in result.reason


def _recovery_runs(compensated: list[float], base: float = 0.85, compressed: float = 0.60) -> list[dict[str, Any]]:
    return runs("comp", compensated, metrics=[{"base/accuracy": base, "compressed/accuracy": compressed}] * 3)


@pytest.mark.parametrize("compensated, expected", [
    ([0.84, 0.83, 0.845], REPRODUCED),  # (0.84 - 0.60) / 0.25 ~ 0.95
    ([0.61, 0.62, 0.605], NOT_REPRODUCED),  # ~ 0.05
    ([0.65, 0.83, 0.72], INCONCLUSIVE),  # 0.2 .. 0.92
], ids=["holds", "fails", "noise"])
def test_recovers(tmp_path: Path, compensated: list[float], expected: str) -> None:
    result = verdict_of(tmp_path, {"method": "comp", "reference": "comp", "quantity": "recovery", "rule": "recovers",
                                   "fraction": 0.5}, _recovery_runs(compensated), methods="comp")
    assert result.verdict == expected
    check = result.checks[0]
    assert check.value == pytest.approx(sum((c - 0.60) / 0.25 for c in compensated) / 3)


def test_recovers_needs_something_to_recover(tmp_path: Path) -> None:
    result = verdict_of(tmp_path, {"method": "comp", "reference": "comp", "rule": "recovers", "fraction": 0.5},
                        _recovery_runs([0.85, 0.85, 0.85], compressed=0.848), methods="comp")
    assert result.verdict == INCONCLUSIVE and "nothing to recover" in result.reason


@pytest.mark.parametrize("second, expected", [
    ({"quantity": "params.trainable", "rule": "less", "factor": 0.1}, REPRODUCED),
    ({"quantity": "params.trainable", "rule": "less", "factor": 0.001}, NOT_REPRODUCED),
    ({"rule": "better"}, INCONCLUSIVE),  # 0.856 vs 0.855: inside the noise
], ids=["all hold", "one fails", "one in the noise"])
def test_all_is_the_conjunction(tmp_path: Path, second: dict[str, Any], expected: str) -> None:
    claim = {"method": "strong", "reference": "lora", "quantity": "metric", "rule": "all",
             "rules": [{"rule": "not_worse", "margin": 0.02}, second]}
    result = verdict_of(tmp_path, claim, runs("strong", [0.857, 0.853, 0.858]) + runs("lora", LORA),
                        methods="strong,lora")
    assert result.verdict == expected
    assert len(result.checks) == 2


def test_combine() -> None:
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED]) == NOT_REPRODUCED
    assert combine([]) == INCONCLUSIVE


def test_one_methods_own_quantities_are_paired_by_seed(tmp_path: Path) -> None:
    # DyLoRA-style: the score at rank 1 vs the same runs' score at rank 8. Seeds differ by a lot, the pairs by little:
    # a paired interval decides it, an unpaired one could not.
    per_seed = [{"accuracy@r=1": 0.80 + d - 0.005, "accuracy@r=8": 0.80 + d} for d in (-0.05, 0.0, 0.05)]
    claim = {"method": "dyn", "reference": "dyn", "quantity": "metrics.{metric}@r=1",
             "reference_quantity": "metrics.{metric}@r=8", "rule": "not_worse", "margin": 0.02}
    result = verdict_of(tmp_path, claim, runs("dyn", [0.8, 0.8, 0.8], metrics=per_seed), methods="dyn")
    assert result.verdict == REPRODUCED
    assert result.checks[0].stat == pytest.approx(-0.005)


def test_trial_records_are_left_out(tmp_path: Path) -> None:
    records = runs("strong", [0.70, 0.71, 0.69]) + runs("lora", LORA)
    records += [run("strong", 7, 0.99, role="trial"), run("strong", 8, 0.99, role="trial")]  # never reported
    result = verdict_of(tmp_path, {"method": "strong", "reference": "lora", "quantity": "metric", "rule": "better"},
                        records, methods="strong,lora")
    assert result.verdict == NOT_REPRODUCED
    assert result.checks[0].n_method == 3


def test_one_seed_is_inconclusive_and_says_so(tmp_path: Path) -> None:
    result = verdict_of(tmp_path, {"method": "strong", "reference": "lora", "quantity": "metric", "rule": "better"},
                        runs("strong", [0.95]) + runs("lora", LORA), methods="strong,lora")
    assert result.verdict == INCONCLUSIVE
    assert "1 seed of the method" in result.reason


def test_no_records_names_the_command_and_draws_nothing(tmp_path: Path) -> None:
    write_records(tmp_path, runs("lora", LORA))  # the reference alone
    path = write_claim(tmp_path / "conf", "lonely", {"method": "dora", "reference": "lora", "quantity": "metric",
                                                     "rule": "better"}, "dora,lora")
    paths, results = write_claims_report(tmp_path, tmp_path / "out", tmp_path / "conf")
    assert results[0].verdict_text == "inconclusive (no records: run python -m bench +claim=lonely -m)"
    assert results[0].figures == [] and not (tmp_path / "out" / "figures" / "lonely.png").exists()
    assert path.stem in (tmp_path / "out" / "claims.md").read_text()


def test_missing_tasks_are_named(tmp_path: Path) -> None:
    write_records(tmp_path, runs("strong", [0.950, 0.951, 0.949]) + runs("lora", LORA))
    path = write_claim(tmp_path / "conf", "c", {"method": "strong", "reference": "lora", "quantity": "metric",
                                                "rule": "better"}, "strong,lora", tasks="glue/sst2,glue/mrpc")
    result = evaluate_claim(load_claim(path), RecordPool(tmp_path))
    assert result.verdict == INCONCLUSIVE
    assert "missing records: glue/mrpc (strong, LoRA)" in result.reason and "holds on glue/sst2" in result.reason


def test_intruders_come_from_the_csv(tmp_path: Path) -> None:
    rows = ["id,method,label,r,seed,task,model,k,eps,intruders,layers"]
    for seed, (full, lora1, lora8) in enumerate([(1, 33, 32), (1, 36, 31)]):
        rows += [f"f{seed},full,Full FT,,{seed},glue/sst2,minilm,10,0.5,{full},37",
                 f"a{seed},lora,LoRA r=1,1.0,{seed},glue/sst2,minilm,10,0.5,{lora1},37",
                 f"b{seed},lora,LoRA r=8,8.0,{seed},glue/sst2,minilm,10,0.5,{lora8},37",
                 f"b{seed},lora,LoRA r=8,8.0,{seed},glue/sst2,minilm,10,0.9,{lora8 * 5},37"]
    csv = tmp_path / "results/intruders/analysis/intruders_total.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("\n".join(rows) + "\n")
    claim = {"method": "full", "reference": "lora", "quantity": "intruders", "eps": 0.5, "rule": "less",
             "factor": 0.5, "reference_select": {"method.r": 8}}
    path = write_claim(tmp_path / "conf", "intr", claim, "full,lora", results_dir="results/intruders")
    result = evaluate_claim(load_claim(path), RecordPool(tmp_path))
    assert result.verdict == REPRODUCED
    assert result.checks[0].value == 1 and result.checks[0].reference_value == 31.5
    csv.unlink()
    result = evaluate_claim(load_claim(path), RecordPool(tmp_path))
    assert result.verdict == INCONCLUSIVE and "python -m analysis intruders" in result.reason


def test_lower_is_better_flips_the_sign() -> None:
    check = evaluate_rule({"rule": "better", "quantity": "curve_area"}, [0.40, 0.41, 0.39], [0.60, 0.61, 0.59],
                          higher=False, check=Check("t", "better", "curve_area", "m", "r"))
    assert check.verdict == REPRODUCED and check.stat == pytest.approx(0.20)


# ---------------------------------------------------------------------------------------------- the claim files


def test_at_least_twenty_claims_with_distinct_papers() -> None:
    claims = load_claims()
    assert len(claims) >= 20
    papers = [c.paper for c in claims]
    assert len(set(papers)) == len(papers), sorted(p for p in papers if papers.count(p) > 1)


@pytest.mark.parametrize("name", CLAIM_NAMES)
def test_claim_file_is_well_formed(name: str) -> None:
    claim = load_claim(CLAIM_DIR / f"{name}.yaml")
    assert claim_problems(claim) == []
    methods = known_methods()
    assert claim.method in methods and claim.rule in RULES
    assert claim.statement and claim.setting and claim.paper
    for leaf in leaves(claim.spec):
        assert leaf["rule"] in RULES and leaf["rule"] != "all"
        assert "reference_value" in leaf or leaf["reference"] in methods
    text = (CLAIM_DIR / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert claim.grid.get("method"), "the claim's grid sweeps its methods"
    assert claim.method in claim.grid["method"] or claim.grid["method"] == [claim.method]


@pytest.fixture(scope="module")
def compose():
    from tests.helpers import compose_cfg  # imports torch and the runner: only for the composition tests

    return compose_cfg


@pytest.mark.parametrize("name", CLAIM_NAMES)
def test_claim_composes_with_hydra(compose, name: str) -> None:
    claim = load_claim(CLAIM_DIR / f"{name}.yaml")
    for method in claim.grid["method"]:
        cfg = compose([f"+claim={name}", f"method={method}", f"task={claim.tasks[0]}"])
        assert cfg.results_dir == claim.results_dir
        assert cfg.claim.paper == claim.paper
        assert cfg.protocol.name == claim.protocol
        assert math.isfinite(float(cfg.method.lr))  # resolves (a per-method lr table included)


def test_zoo_claims_run_the_zoo_cells(compose) -> None:
    """A claim on results/zoo changes nothing of a zoo_tuned cell but the `claim:` node itself."""
    from bench.run import semantic_config

    for claim in load_claims():
        if claim.results_dir != "results/zoo":
            continue
        method, task = claim.grid["method"][0], claim.tasks[-1]
        ours = semantic_config(compose([f"+claim={claim.name}", f"method={method}", f"task={task}"]))
        zoo = semantic_config(compose(["+experiment=zoo_tuned", f"method={method}", f"task={task}"]))
        ours.pop("claim", None)
        assert ours == zoo, claim.name


def test_a_claim_grid_reuses_the_zoo_cell_keys(compose) -> None:
    from bench.run import semantic_config

    ours = semantic_config(compose(["+claim=dora_beats_lora", "method=dora", "task=glue/sst2"]))
    zoo = semantic_config(compose(["+experiment=zoo_tuned", "method=dora", "task=glue/sst2"]))
    assert ours == zoo


def test_intruder_claim_sets_each_methods_learning_rate(compose) -> None:
    lrs = {m: float(compose(["+claim=intruder_dimensions", f"method={m}"]).method.lr) for m in ("full", "lora")}
    assert lrs == {"full": 5e-5, "lora": 3e-3}
    cfg = compose(["+claim=intruder_dimensions", "method=lora"])
    assert cfg.train.max_steps == 800 and cfg.method.r == 8 and cfg.results_dir == "results/intruders"


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_writes_claims_md_on_a_tmp_results_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.__main__ import main

    write_records(tmp_path, runs("dora", [0.950, 0.951, 0.949]) + runs("lora", LORA)
                  + [run("lora", 5, 0.99, role="trial")])
    out = tmp_path / "out"
    assert main(["claims", "--results-root", str(tmp_path), "--out", str(out)]) == 0
    text = (out / "claims.md").read_text()
    assert f"{len(CLAIM_NAMES)} claims" in text
    for name in CLAIM_NAMES:
        assert f"## {name}" in text
    assert "inconclusive (no records: run python -m bench +claim=galore_memory -m)" in text
    dora = [line for line in text.splitlines() if line.startswith("| [dora_beats_lora]")][0]
    assert "missing records: glue/mrpc (DoRA, LoRA), glue/cola (DoRA, LoRA)" in dora
    assert "holds on glue/sst2" in dora
    assert (out / "figures" / "dora_beats_lora.png").is_file() and (out / "figures" / "dora_beats_lora.pdf").is_file()
    assert not (out / "figures" / "galore_memory.png").exists()
    table = (out / "claims.csv").read_text().splitlines()
    assert table[0].startswith("claim,paper,method,reference,setting,task,rule,quantity")
    assert "wrote" in capsys.readouterr().out
    # Unchanged inputs: the same files, figures not redrawn (their digest matches)
    before = (out / "figures" / "dora_beats_lora.png").stat().st_mtime_ns
    assert main(["claims", "--results-root", str(tmp_path), "--out", str(out)]) == 0
    assert (out / "figures" / "dora_beats_lora.png").stat().st_mtime_ns == before
    assert (out / "claims.md").read_text() == text

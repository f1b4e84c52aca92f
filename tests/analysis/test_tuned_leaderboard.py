"""The leaderboard under the tuning protocol: trials left out, rows sorted by score, significance marks against
constructed data with a known answer, loud marks on mixed comparisons, and committed tables rebuilt byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from analysis.leaderboard import load_leaderboard, write_leaderboard
from tests.analysis.test_leaderboard import TRAINABLE, make_record

REPO = Path(__file__).resolve().parents[2]
TRAINABLE.update(strong=1000, twin=2000, dora=360_000, a=1, b=2, c=3, d=4)  # parameter counts of the constructed methods


def tuned(method: str, seed: int, score: float, role: str = "final", protocol: str = "cheap",
          steps: int = 100) -> dict[str, Any]:
    record = make_record(method, "glue/sst2", seed, score, cell_key=f"{method}-{role}-{protocol}-{steps}-{seed}")
    record["tuning"] = {"protocol": protocol, "role": role if protocol != "none" else None,
                        "budget": {"max_steps": steps, "batch_size": 32, "grad_accum": 1}}
    if role == "final" and protocol != "none":
        record["tuning"].update(trials={"total": 4, "complete": 4, "pruned": 0, "fail": 0}, chosen={"lr": 1e-3},
                                val_objective=score + 0.02, sharpness={"lambda_max": 1.5},
                                trial_values=[{"params": {"lr": v}} for v in (1e-4, 3e-4, 1e-3, 3e-3)])
    if role == "trial":
        record["eval_split"] = "validation"
    return record


def write(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    for r in records:
        (tmp_path / "runs" / r["id"]).mkdir(parents=True)
        (tmp_path / "runs" / r["id"] / "record.json").write_text(json.dumps(r))
    return tmp_path


def test_significance_marks_follow_a_known_answer(tmp_path):
    # "strong" beats everyone by 10 points with tiny seed noise; "twin" equals lora within noise
    records = [tuned("strong", s, 0.95 + d) for s, d in enumerate((0.001, -0.001, 0.0))]
    records += [tuned("lora", s, 0.85 + d) for s, d in enumerate((0.01, -0.01, 0.0))]
    records += [tuned("twin", s, 0.85 + d) for s, d in enumerate((0.012, -0.008, -0.004))]
    records += [tuned("lora", 9, 0.99, role="trial")]  # a trial's score is never reported
    board = load_leaderboard(write(tmp_path, records))
    table = board.model_tables["minilm"]
    assert list(table["method"]) == ["strong", "lora", "twin"] or list(table["method"]) == ["strong", "twin", "lora"]
    cells = dict(zip(table["method"], table.iloc[:, 1]))
    assert cells["strong"].startswith("**95.0")  # best, bold
    assert not cells["lora"].endswith("≈") and not cells["twin"].endswith("≈")  # both clearly below the best
    summary = board.summary.set_index("method")
    assert summary.at["strong", "vs_lora_p"] < 0.05 and summary.at["strong", "vs_lora_diff"] == pytest.approx(0.10)
    assert summary.at["twin", "vs_lora_p"] > 0.05  # inside the seed noise of the reference
    assert board.trial_records == 1 and "1 tuning trials" in board.to_markdown()
    assert summary.at["lora", "score_mean"] == pytest.approx(0.85)  # the 0.99 trial was left out
    details = board.task_tables["glue/sst2"]
    assert details.set_index("method").at["twin", "Δ lora"].endswith(")") and "n.s." in \
        details.set_index("method").at["twin", "Δ lora"]
    assert not board.warnings


def test_a_mixed_comparison_is_marked_loudly(tmp_path):
    records = [tuned("lora", s, 0.85) for s in range(3)]
    records += [tuned("dora", s, 0.86, protocol="none", steps=400) for s in range(3)]
    board = load_leaderboard(write(tmp_path, records))
    text = board.to_markdown()
    assert "MIXES TUNING PROTOCOLS" in text and "MIXES BUDGETS" in text
    tuning = dict(zip(board.model_tables["minilm"]["method"], board.model_tables["minilm"]["tuning"]))
    assert tuning == {"dora": "untuned · 400×32", "lora": "cheap · 4 trials · 100×32"}


def test_the_chosen_value_at_an_end_of_the_range_says_so(tmp_path):
    records = [tuned("lora", s, 0.85) for s in range(2)]
    for r in records:
        r["tuning"]["chosen"] = {"lr": 3e-3}
    board = load_leaderboard(write(tmp_path, records))
    assert "end of the searched range" in board.to_markdown()


@pytest.mark.parametrize("where", ["results", "results/zoo", "results/peft"])
def test_committed_tables_rebuild_byte_for_byte_from_committed_records(where, tmp_path):
    source = REPO / where
    if not (source / "runs").is_dir():
        pytest.skip(f"{where} has no committed records")
    shutil.copytree(source / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns("*.safetensors", "*.pt"))
    written = write_leaderboard(tmp_path)
    assert written
    for path in written:
        committed = source / path.name
        assert committed.exists(), f"{where}/{path.name} is not committed"
        assert path.read_bytes() == committed.read_bytes(), f"{where}/{path.name} differs from its records"


def test_tuning_report_gives_rank_changes_and_the_sharpness_correlation():
    from analysis.tuning import sharpness_correlation, study_rows

    def final(method: str, default: float, chosen: float, val_default: float, val_tuned: float, sharp: float):
        record = tuned(method, 0, val_tuned - 0.05)
        record["tuning"].update(defaults={"lr": default}, chosen={"lr": chosen}, val_objective=val_tuned,
                                sharpness={"lambda_max": sharp},
                                trial_values=[{"params": {"lr": default}, "objective": val_default},
                                              {"params": {"lr": chosen}, "objective": val_tuned}])
        return record

    # a is best untuned, c gains most from tuning and overtakes it; sharper methods chose smaller learning rates
    records = [final("a", 1e-3, 1e-3, 0.90, 0.90, 1.0), final("b", 1e-3, 3e-3, 0.80, 0.85, 0.5),
               final("c", 1e-3, 1e-4, 0.70, 0.95, 10.0), final("d", 1e-3, 3e-4, 0.60, 0.61, 3.0)]
    df = study_rows(records).set_index("method")
    assert df.loc["c", "rank_default"] == 3 and df.loc["c", "rank_tuned"] == 1 and df.loc["c", "rank_change"] == 2
    assert df.loc["a", "rank_change"] == -1 and df.loc["a", "val_gain"] == 0
    assert df.loc["b", "val_gain"] == pytest.approx(0.05)
    corr = sharpness_correlation(study_rows(records))
    assert corr.loc[0, "spearman_rho"] == pytest.approx(-1.0)  # a perfect inverse ordering


def test_three_methods_on_two_tasks_get_a_friedman_test_and_a_cd_diagram(tmp_path):
    records = []
    for task, base in (("glue/sst2", 0.85), ("glue/mrpc", 0.80)):
        for method, gap in (("strong", 0.05), ("lora", 0.0), ("twin", -0.05)):
            for seed in range(2):
                r = tuned(method, seed, base + gap + 0.001 * seed)
                r.update(task=task, main_metric="accuracy", id=f"{task[5:]}-{r['id']}", cell_key=f"{task}-{r['cell_key']}")
                records.append(r)
    board = load_leaderboard(write(tmp_path, records))
    result = board.friedman["minilm"]
    assert result.n_blocks == 2 and list(result.mean_ranks.index) == ["strong", "lora", "twin"]
    assert list(board.model_tables["minilm"]["method"]) == ["strong", "lora", "twin"]  # sorted by mean rank
    assert "Friedman test over the 2 tasks" in board.to_markdown()
    paths = board.write(tmp_path / "out")
    assert {p.name for p in paths} >= {"leaderboard_cd_minilm.png", "leaderboard_cd_minilm.pdf"}


def test_a_method_whose_every_trial_failed_is_named_not_dropped(tmp_path):
    records = [tuned("lora", s, 0.85) for s in range(2)]
    for seed in range(2):
        r = tuned("strong", seed, 0.5, role="trial")
        r.update(status="diverged", id=f"{r['id']}-t{seed}", cell_key=f"{r['cell_key']}-t{seed}")
        records.append(r)
    board = load_leaderboard(write(tmp_path, records))
    assert any("strong: NO REPORTED RUN" in w and "2 diverged" in w for w in board.warnings)

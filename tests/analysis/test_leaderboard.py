"""Leaderboard from synthetic run records."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.leaderboard import (
    GLUE_TASKS,
    build_leaderboard,
    load_leaderboard,
    mean_ranks,
    rank_methods,
    t_interval,
    write_leaderboard,
)
from analysis.records import RecordWarning, curves_frame, load_records, records_frame

REPO = Path(__file__).resolve().parents[2]
MODEL = "minilm"
MAIN_METRIC = {
    "glue/cola": "matthews_corr",
    "glue/sst2": "accuracy",
    "glue/mrpc": "f1",
    "glue/stsb": "pearson",
    "glue/qqp": "f1",
    "glue/mnli": "accuracy",
    "glue/qnli": "accuracy",
    "glue/rte": "accuracy",
}
HELDOUT = {"glue/mnli", "glue/qqp"}
MNLI_NOTE = "Scored on 1k rows held out from the MNLI train sample; no official dev set is available."

# Inputs: (method, task) -> main-metric value per seed.
SCORES: dict[tuple[str, str], list[float]] = {
    ("lora", "glue/cola"): [0.41, 0.45],
    ("lora", "glue/sst2"): [0.851, 0.867],
    ("lora", "glue/mrpc"): [0.88, 0.86],
    ("lora", "glue/stsb"): [0.84, 0.86],
    ("lora", "glue/qqp"): [0.79, 0.80],
    ("lora", "glue/mnli"): [0.70, 0.72],
    ("lora", "glue/qnli"): [0.83, 0.85],
    ("lora", "glue/rte"): [0.61],
    ("full", "glue/sst2"): [0.90, 0.912],
    ("full", "glue/mnli"): [0.75, 0.77],
}
TRAINABLE = {"lora": 338_690, "full": 22_713_216}
TOTAL = 23_052_676


def make_record(
    method: str,
    task: str,
    seed: int,
    score: float | None,
    status: str = "completed",
    finished: str = "2026-11-24T03:00:00+00:00",
    error: dict[str, str] | None = None,
    cell_key: str | None = None,
) -> dict[str, Any]:
    """A record following the benchmark's record.json schema."""
    main = MAIN_METRIC[task]
    metrics: dict[str, float] = {}
    if status == "completed" and score is not None:
        metrics = {main: score, "loss": 1.0 - score}
        if task == "glue/stsb":
            metrics["spearmanr"] = score - 0.01
    name = task.replace("/", "-")
    key = cell_key or f"{method}-{name}-{seed}"
    return {
        "schema": 1,
        "id": f"{name}__{method}__{MODEL}__s{seed}__{hashlib.sha1((key + finished).encode()).hexdigest()[:8]}",
        "cell_key": key,
        "status": status,
        "method": method,
        "task": task,
        "suite": "glue",
        "model": MODEL,
        "seed": seed,
        "config": {"method": {"name": method}},
        "metrics": metrics,
        "main_metric": main,
        "higher_is_better": {main: True, "loss": False, "spearmanr": True},
        "eval_split": "heldout_from_train" if task in HELDOUT else "dev",
        "eval_note": MNLI_NOTE if task == "glue/mnli" else ("QQP held out from train." if task in HELDOUT else ""),
        "curve": [{"step": 1, "loss": 0.69, "lr": 1e-4}],
        "eval_history": [],
        "params": {"trainable": TRAINABLE[method], "total": TOTAL, "adapter_bytes": 4 * TRAINABLE[method]},
        "cost": {
            "train_s": 120.0 + seed,
            "step_s": 0.29,
            "tokens_per_s": 2100.0,
            "peak_mem_bytes": 1.2e9,
            "peak_mem_kind": "rss",
            "device": "cpu",
        },
        "env": {"python": "3.11.7"},
        "timestamps": {"created": finished, "started": finished, "finished": finished},
        "error": error,
    }


def write_record(results: Path, record: dict[str, Any]) -> None:
    run_dir = results / "runs" / record["id"]
    run_dir.mkdir(parents=True)
    (run_dir / "record.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results directory with completed, failed, rerun and broken records."""
    out = tmp_path / "results"
    for (method, task), values in SCORES.items():
        for seed, value in enumerate(values):
            write_record(out, make_record(method, task, seed, value))
    # A failed cell, with a multi-line message.
    error = {"type": "ValueError", "message": "bad batch shape\nsecond line", "traceback": "Traceback ..."}
    write_record(out, make_record("full", "glue/rte", 0, None, status="failed", error=error))
    # An earlier failed attempt of a cell that later completed: the rerun wins.
    write_record(
        out,
        make_record(
            "lora", "glue/sst2", 0, None, status="failed", finished="2026-11-23T00:00:00+00:00",
            error={"type": "RuntimeError", "message": "rerun me"}, cell_key="lora-glue-sst2-0",
        ),
    )
    # A partially written record.
    broken = out / "runs" / "broken"
    broken.mkdir(parents=True)
    (broken / "record.json").write_text('{"schema": 1, "id": "glue-sst2__lo')
    return out


def expected_records() -> int:
    return sum(len(v) for v in SCORES.values()) + 2


@pytest.fixture
def frame(results: Path) -> pd.DataFrame:
    with pytest.warns(RecordWarning, match="broken"):
        return records_frame(load_records(results))


def test_load_skips_broken_and_collapses_reruns(frame: pd.DataFrame) -> None:
    assert frame.attrs["records_read"] == expected_records()
    assert len(frame) == expected_records() - 1  # the rerun collapses onto its completed record
    sst2 = frame[(frame["method"] == "lora") & (frame["task"] == "glue/sst2") & (frame["seed"] == 0)]
    assert list(sst2["status"]) == ["completed"]
    assert {"metric.accuracy", "metric.loss", "metric.pearson", "score", "finished"} <= set(frame.columns)


def test_mean_and_sample_std(frame: pd.DataFrame) -> None:
    board = build_leaderboard(frame)
    summary = board.summary.set_index(["method", "model", "task"])
    for (method, task), values in SCORES.items():
        row = summary.loc[(method, MODEL, task)]
        assert row["n_seeds"] == len(values)
        assert row["score_mean"] == pytest.approx(np.mean(values))
        if len(values) > 1:
            assert row["score_std"] == pytest.approx(np.std(values, ddof=1))
        else:
            assert np.isnan(row["score_std"])
    values = SCORES[("lora", "glue/sst2")]
    cell = f"{np.mean(values) * 100:.1f} ± {np.std(values, ddof=1) * 100:.1f}"
    assert cell in board.to_markdown()
    # One seed where two is usual: flagged.
    assert f"{SCORES[('lora', 'glue/rte')][0] * 100:.1f} (n=1)" in board.to_markdown()


def test_glue_average_only_for_complete_method(frame: pd.DataFrame) -> None:
    board = build_leaderboard(frame)
    task_means = [np.mean(SCORES[("lora", task)]) for task in GLUE_TASKS]
    glue = board.glue.set_index("method")
    assert glue.loc["lora", "glue_avg"] == pytest.approx(np.mean(task_means))
    assert np.isnan(glue.loc["full", "glue_avg"])

    table = board.model_tables[MODEL].set_index("method")
    assert float(table.loc["lora", "GLUE avg"]) == pytest.approx(np.mean(task_means) * 100, abs=0.05 + 1e-9)
    assert table.loc["full", "GLUE avg"].startswith("—")
    markdown = board.to_markdown()
    assert "GLUE avg needs all 8 subtasks; missing cola, mrpc, stsb, qqp, qnli, rte" in markdown
    assert list(table.index) == ["full", "lora"]  # full first


def test_failed_cell_counted_and_listed(frame: pd.DataFrame) -> None:
    board = build_leaderboard(frame)
    markdown = board.to_markdown()
    n_cells = expected_records() - 1
    assert f"Read {expected_records()} records" in markdown
    assert f"{n_cells} reported run cells: {n_cells - 1} completed, 1 failed." in markdown
    assert "ValueError: bad batch shape" in markdown
    assert "second line" not in markdown
    assert "rerun me" not in markdown
    # A cell with no completed run never gets a number.
    table = board.model_tables[MODEL].set_index("method")
    rte_column = next(column for column in table.columns if column.startswith("glue/rte"))
    assert table.loc["full", rte_column] == "—"


def test_heldout_footnotes_and_directions(frame: pd.DataFrame) -> None:
    board = build_leaderboard(frame)
    markdown = board.to_markdown()
    notes = [note for note in board.footnotes if note.startswith("glue/mnli")]
    assert len(notes) == 1
    assert "NOT the official dev set" in notes[0] and MNLI_NOTE in notes[0]
    assert any(note.startswith("glue/qqp") for note in board.footnotes)
    assert not any(note.startswith("glue/sst2") for note in board.footnotes)
    assert MNLI_NOTE in markdown
    assert "loss ↓" in board.task_tables["glue/sst2"].columns


def test_written_files(results: Path, tmp_path: Path) -> None:
    with pytest.warns(RecordWarning):
        paths = write_leaderboard(results, tmp_path / "out")
    assert [p.name for p in paths] == ["leaderboard.md", "leaderboard.csv", "leaderboard.html"]

    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    expected = {
        "method", "model", "task", "n_seeds", "score_mean", "score_std", "metric.accuracy.mean",
        "metric.loss.mean", "trainable", "trainable_pct", "train_s_median", "step_s_median",
        "peak_mem_bytes_median", "peak_mem_kind",
    }
    assert expected <= set(csv.columns)
    assert len(csv) == len(SCORES) + 1  # plus the failed-only cell
    row = csv[(csv["method"] == "lora") & (csv["task"] == "glue/sst2")].iloc[0]
    assert row["score_mean"] == pytest.approx(np.mean(SCORES[("lora", "glue/sst2")]))
    assert row["trainable_pct"] == pytest.approx(100 * TRAINABLE["lora"] / TOTAL)
    failed = csv[(csv["method"] == "full") & (csv["task"] == "glue/rte")].iloc[0]
    assert failed["n_seeds"] == 0 and failed["n_failed"] == 1 and np.isnan(failed["score_mean"])

    page = (tmp_path / "out" / "leaderboard.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table" in page and "GLUE avg" in page
    assert "<script" not in page and "http" not in page


def test_cli_writes_and_prints(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", "leaderboard", "--results", str(results), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out / "leaderboard.md") in proc.stdout
    assert "| method" in proc.stdout
    assert "broken" in proc.stderr
    assert (out / "leaderboard.csv").exists()


def test_cli_fails_on_empty_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", "leaderboard", "--results", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert str(tmp_path) in proc.stderr and "python -m bench" in proc.stderr
    assert not (tmp_path / "leaderboard.md").exists()


# ---------------------------------------------------------------------------
# Confidence intervals, rank aggregation, suite averages


def simple_record(
    method: str,
    task: str,
    seed: int,
    value: float,
    *,
    model: str = MODEL,
    metric: str = "accuracy",
    higher: bool = True,
    suite: str | None = None,
    memory_kind: str = "rss",
) -> dict[str, Any]:
    """A minimal completed record with one metric."""
    return {
        "id": f"{task.replace('/', '-')}__{method}__{model}__s{seed}",
        "cell_key": f"{model}-{method}-{task}-{seed}",
        "status": "completed",
        "method": method,
        "task": task,
        "suite": suite,
        "model": model,
        "seed": seed,
        "metrics": {metric: value},
        "main_metric": metric,
        "higher_is_better": {metric: higher},
        "eval_split": "dev",
        "params": {"trainable": 1000, "total": 10_000, "adapter_bytes": 4000},
        "cost": {"train_s": 10.0, "peak_mem_bytes": 3.2e9, "peak_mem_kind": memory_kind},
        "timestamps": {"finished": "2026-11-24T03:00:00+00:00"},
    }


def test_confidence_interval_is_student_t(frame: pd.DataFrame, results: Path, tmp_path: Path) -> None:
    board = build_leaderboard(frame)
    summary = board.summary.set_index(["method", "model", "task"])
    for (method, task), values in SCORES.items():
        row = summary.loc[(method, MODEL, task)]
        if len(values) < 2:
            assert np.isnan(row["score_ci95_low"]) and np.isnan(row["score_ci95_high"])
            continue
        low, high = stats.t.interval(
            0.95, df=len(values) - 1, loc=np.mean(values), scale=stats.sem(values)
        )
        assert row["score_ci95_low"] == pytest.approx(low)
        assert row["score_ci95_high"] == pytest.approx(high)

    # The per-task detail table shows it on the main metric's scale; blank for one seed.
    values = SCORES[("lora", "glue/sst2")]
    low, high = stats.t.interval(0.95, df=len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    sst2 = board.task_tables["glue/sst2"].set_index("method")
    assert sst2.loc["lora", "95% CI"] == f"[{low * 100:.1f}, {high * 100:.1f}]"
    rte = board.task_tables["glue/rte"].set_index("method")
    assert rte.loc["lora", "95% CI"] == ""
    assert "95% CI" in board.to_html() and "Student t" in board.to_markdown()

    # ... and the CSV carries the raw bounds.
    with pytest.warns(RecordWarning):
        write_leaderboard(results, tmp_path / "ci")
    csv = pd.read_csv(tmp_path / "ci" / "leaderboard.csv")
    row = csv[(csv["method"] == "lora") & (csv["task"] == "glue/sst2")].iloc[0]
    assert (row["score_ci95_low"], row["score_ci95_high"]) == (pytest.approx(low), pytest.approx(high))


def test_t_interval_edge_cases() -> None:
    assert all(np.isnan(t_interval([0.5])))
    assert all(np.isnan(t_interval([])))
    low, high = t_interval([0.2, float("nan"), 0.4, 0.3])  # NaN dropped: n = 3
    expected = stats.t.interval(0.95, df=2, loc=0.3, scale=stats.sem([0.2, 0.4, 0.3]))
    assert (low, high) == (pytest.approx(expected[0]), pytest.approx(expected[1]))


def rank_records() -> list[dict[str, Any]]:
    """Three methods on one model; the known answer is worked out in ``test_mean_rank``.

    glue/sst2 (accuracy, higher is better): full 0.90; lora 0.79/0.81 and dora 0.80 tie at a mean of 0.80.
    lm/wiki (perplexity, lower is better): dora 9 < full 10 < lora 12.
    glue/cola: dora has no result, so the task is left out of the mean rank.
    """
    records = [
        simple_record("full", "glue/sst2", 0, 0.90, model="ranker"),
        simple_record("lora", "glue/sst2", 0, 0.79, model="ranker"),
        simple_record("lora", "glue/sst2", 1, 0.81, model="ranker"),
        simple_record("dora", "glue/sst2", 0, 0.80, model="ranker"),
        simple_record("full", "glue/cola", 0, 0.50, model="ranker", metric="matthews_corr"),
        simple_record("lora", "glue/cola", 0, 0.60, model="ranker", metric="matthews_corr"),
    ]
    for method, ppl in (("full", 10.0), ("lora", 12.0), ("dora", 9.0)):
        records.append(simple_record(method, "lm/wiki", 0, ppl, model="ranker", metric="perplexity", higher=False))
    return records


def test_mean_rank() -> None:
    board = build_leaderboard(records_frame(rank_records()))
    ranks = board.summary.set_index(["method", "task"])["rank"]
    # Per task, 1 = best; ties share the average rank; perplexity ranks ascending.
    assert ranks[("full", "glue/sst2")] == 1 and ranks[("lora", "glue/sst2")] == 2.5 == ranks[("dora", "glue/sst2")]
    assert (ranks[("dora", "lm/wiki")], ranks[("full", "lm/wiki")], ranks[("lora", "lm/wiki")]) == (1, 2, 3)
    assert (ranks[("lora", "glue/cola")], ranks[("full", "glue/cola")]) == (1, 2)

    expected = {"full": (1 + 2) / 2, "lora": (2.5 + 3) / 2, "dora": (2.5 + 1) / 2}  # cola excluded
    mean = board.mean_ranks.set_index("method")
    for method, value in expected.items():
        assert mean.loc[method, "mean_rank"] == pytest.approx(value)
        assert mean.loc[method, "n_tasks"] == 2
    assert mean.loc["full", "tasks"] == "glue/sst2,lm/wiki"

    table = board.model_tables["ranker"].set_index("method")
    column = next(c for c in table.columns if c.startswith("mean rank"))
    assert {m: table.loc[m, column] for m in expected} == {m: f"{v:.2f}" for m, v in expected.items()}
    note = next(n for n in board.footnotes if n.startswith("ranker: mean rank"))
    assert "2 tasks" in note and "glue/sst2, lm/wiki" in note and "tied means share the average" in note
    assert column.endswith(f"[{board.footnotes.index(note) + 1}]")


def test_rank_methods_and_mean_ranks_directly() -> None:
    summary = pd.DataFrame(
        {
            "model": ["m"] * 5,
            "task": ["a", "a", "a", "b", "b"],
            "method": ["x", "y", "z", "x", "y"],
            "main_metric": ["acc", "acc", "acc", "err", "err"],
            "score_mean": [0.5, 0.7, 0.7, 0.1, np.nan],
        }
    )
    ranks = rank_methods(summary, higher=lambda metric: metric != "err")
    assert ranks.tolist()[:4] == [3.0, 1.5, 1.5, 1.0] and np.isnan(ranks.iloc[4])
    summary["rank"] = ranks
    mean = mean_ranks(summary).set_index("method")
    # Only task a has results for all of x, y, z.
    assert mean["mean_rank"].to_dict() == {"x": 3.0, "y": 1.5, "z": 1.5}
    assert set(mean["tasks"]) == {"a"}


def commonsense_records() -> list[dict[str, Any]]:
    """A "commonsense" suite seen only through its records: lora ran all three tasks, full two."""
    scores = {
        ("lora", "commonsense/boolq"): [0.61, 0.63],
        ("lora", "commonsense/piqa"): [0.70, 0.72],
        ("lora", "commonsense/arc_e"): [0.55, 0.57],
        ("full", "commonsense/boolq"): [0.66],
        ("full", "commonsense/arc_e"): [0.60],
    }
    return [
        simple_record(method, task, seed, value, model="smollm", suite="commonsense", memory_kind="cuda_max_allocated")
        for (method, task), values in scores.items()
        for seed, value in enumerate(values)
    ]


def test_commonsense_suite_average() -> None:
    board = build_leaderboard(records_frame(commonsense_records()))
    expected = np.mean([np.mean([0.61, 0.63]), np.mean([0.70, 0.72]), np.mean([0.55, 0.57])])
    suites = board.suites.set_index(["suite", "method"])
    assert suites.loc[("commonsense", "lora"), "average"] == pytest.approx(expected)
    assert suites.loc[("commonsense", "lora"), "n_members"] == 3
    assert np.isnan(suites.loc[("commonsense", "full"), "average"])
    assert suites.loc[("commonsense", "full"), "missing"] == "commonsense/piqa"
    assert board.glue.empty

    table = board.model_tables["smollm"].set_index("method")
    assert "GLUE avg" not in table.columns
    assert table.loc["lora", "commonsense avg"] == f"{expected * 100:.1f}"
    assert table.loc["full", "commonsense avg"].startswith("—")
    markdown = board.to_markdown()
    assert "commonsense avg needs all 3 subtasks; missing piqa" in markdown
    # The memory kind is named.
    assert "3.2 GB CUDA max allocated" in markdown


def test_glue_and_commonsense_together(frame: pd.DataFrame) -> None:
    both = pd.concat([frame, records_frame(commonsense_records())], ignore_index=True)
    both.attrs = frame.attrs
    board = build_leaderboard(both)
    assert set(board.suites["suite"]) == {"glue", "commonsense"}
    assert "GLUE avg" in board.model_tables[MODEL].columns
    assert "commonsense avg" not in board.model_tables[MODEL].columns
    assert "commonsense avg" in board.model_tables["smollm"].columns
    glue = board.glue.set_index("method")
    assert glue.loc["lora", "glue_avg"] == pytest.approx(np.mean([np.mean(SCORES[("lora", t)]) for t in GLUE_TASKS]))


def test_curves_frame_long_form(results: Path) -> None:
    with pytest.warns(RecordWarning):
        records = load_records(results)
    curves = curves_frame(records)
    # One logged step per run cell; the failed attempt of a rerun cell is collapsed away.
    assert len(curves) == expected_records() - 1
    assert list(curves.columns[:9]) == ["id", "cell_key", "status", "method", "task", "suite", "model", "seed", "step"]
    assert {"loss", "lr"} <= set(curves.columns)
    assert curves["loss"].eq(0.69).all() and curves["step"].eq(1).all()
    sst2 = curves[(curves["method"] == "lora") & (curves["task"] == "glue/sst2") & (curves["seed"] == 0)]
    assert list(sst2["status"]) == ["completed"]


def test_hyperparameter_variants_are_rows_of_their_own() -> None:
    from analysis.leaderboard import label_variants

    base = {"model": "minilm", "task": "glue/sst2", "method": "lora"}
    records = [dict(base, id=f"{r}-{s}", config={"method": {"r": r, "lr": 3e-3}}) for r in (1, 8) for s in (0, 1)]
    records.append(dict(base, method="full", id="f", config={"method": {"lr": 5e-5}}))
    labels = [r["method"] for r in label_variants(records)]
    assert labels == ["lora (r=1)", "lora (r=1)", "lora (r=8)", "lora (r=8)", "full"]


def test_a_running_cell_of_a_method_without_results_is_counted_not_a_crash(results: Path) -> None:
    """A run that has just started has no main metric yet (null in its record): the table names it as running."""
    record = make_record("full", "glue/cola", 0, None, status="running")
    record["main_metric"] = None
    record["method"] = "newcomer"
    record["id"] = record["id"].replace("__full__", "__newcomer__")
    write_record(results, record)
    with pytest.warns(RecordWarning, match="broken"):
        markdown = build_leaderboard(records_frame(load_records(results))).to_markdown()
    assert "1 running" in markdown


def test_chance_row_and_marks_scores_not_above_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chance score a record carries becomes the table's last row; a score whose seeds do not beat it
    significantly (or a single seed at or below it) is marked, one clearly above it is not."""
    out = tmp_path / "results"
    seeds = {"lora": [0.815, 0.812, 0.818], "full": [0.86, 0.87, 0.865], "dora": [0.80]}
    for method, values in seeds.items():
        monkeypatch.setitem(TRAINABLE, method, TRAINABLE.get(method, 360_000))
        for seed, value in enumerate(values):
            record = make_record(method, "glue/mrpc", seed, value)
            record["chance"] = {"f1": 0.8122, "accuracy": 0.684}
            write_record(out, record)
    board = load_leaderboard(out)
    table = board.model_tables[MODEL].set_index("method")
    column = next(c for c in table.columns if c.startswith("glue/mrpc"))
    assert table.index[-1] == "*chance*" and table.at["*chance*", column] == "81.2"
    assert table.at["lora", column].endswith("°") and table.at["dora", column].endswith("°")
    assert not table.at["full", column].endswith("°")
    summary = board.summary.set_index("method")
    assert summary.at["full", "vs_chance_p"] < 0.05 <= summary.at["lora", "vs_chance_p"]
    details = board.task_tables["glue/mrpc"].set_index("method")
    assert details.at["lora", "chance"] == "81.2" and details.at["lora", "> chance"] == "° no"
    assert details.at["full", "> chance"].startswith("yes (p=")
    assert "°" in board.legend() and "*chance*" in board.to_markdown()

"""The unlearning report (analysis/unlearning.py) on records written by hand in bench/run.py's format, and the
committed reports of the composite families rebuilt from their committed records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.__main__ import main
from analysis.records import NoRecordsError
from analysis.unlearning import summary, unlearn_rows, write_unlearn_report

REPO = Path(__file__).resolve().parents[2]
TAUGHT = {"forget_acc": 0.95, "retain_acc": 0.9, "forget_prob": 0.8, "retain_prob": 0.7, "unlearn_score": 0.1}


def write(results: Path, method: str, objective: str, seed: int, forget: float, retain: float,
          status: str = "completed") -> None:
    metrics = {"forget_acc": forget, "retain_acc": retain, "forget_prob": 0.1, "retain_prob": 0.5,
               "forget_rouge": forget, "retain_rouge": retain, "forget_ce_increase": 0.25,
               "unlearn_score": 2 * (1 - forget) * retain / (1 - forget + retain),
               **{f"taught/{k}": v for k, v in TAUGHT.items()}}
    run_id = f"unlearn-facts__{method}__smollm2__s{seed}__{objective}"
    record = {"id": run_id, "cell_key": f"{method}{objective}{seed}", "status": status, "task": "unlearn/facts",
              "method": method, "model": "smollm2", "seed": seed, "metrics": metrics,
              "main_metric": "unlearn_score", "taught": {"run_id": "teacher-0", "method": "full", "known": 0.91},
              "config": {"task": {"source": "offline", "forget_fraction": 0.1, "objective": objective},
                         "method": {"lr": 1e-3}, "train": {"max_steps": 12}},
              "timestamps": {"finished": "2026-12-07T00:00:00+00:00"}}
    (results / "runs" / run_id).mkdir(parents=True)
    (results / "runs" / run_id / "record.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path):
    write(tmp_path, "lora", "ihl", 0, 0.10, 0.80)
    write(tmp_path, "lora", "ihl", 1, 0.20, 0.70)
    write(tmp_path, "lora", "ga", 0, 0.0, 0.05)
    write(tmp_path, "fila", "ihl", 0, 0.05, 0.85)
    write(tmp_path, "full", "gd", 0, 0.5, 0.5, status="failed")
    return tmp_path


def test_rows_group_seeds_and_keep_the_taught_model(results):
    from analysis.records import load_records

    rows, taught = unlearn_rows(load_records(results))
    assert len(rows) == 4 and set(rows["method"]) == {"lora", "fila"}  # the failed run is not a row
    table = summary(rows)
    ihl = table[(table["method"] == "lora") & (table["objective"] == "ihl")].iloc[0]
    assert ihl["n"] == 2 and ihl["forget_acc"] == pytest.approx(0.15)
    assert taught.iloc[0]["teacher"] == "teacher-0" and taught.iloc[0]["forget_acc"] == 0.95


def test_report_lists_the_taught_model_first_and_draws_the_tradeoff(results, capsys):
    assert main(["unlearn", "--results", str(results)]) == 0
    text = (results / "unlearn.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| taught (teacher-0)")  # after the header row
    assert lines[2].startswith("| fila ")  # best score first
    assert "15.0 ± 7.1" in text  # two seeds of lora/ihl: forget 10 and 20
    assert (results / "unlearn_tradeoff.png").stat().st_size > 0 and (results / "unlearn_tradeoff.pdf").is_file()
    assert "unlearn.md" in capsys.readouterr().out


def test_no_unlearning_record_is_an_error_naming_the_command(tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "record.json").write_text(json.dumps({"id": "x", "status": "completed",
                                                                      "task": "glue/sst2", "cell_key": "k"}))
    with pytest.raises(NoRecordsError, match="task=unlearn/facts"):
        write_unlearn_report(tmp_path)


COMMITTED = [(command, results, name) for command, results, name in (
    ("merge", "results/merge", "merge.md"), ("continual", "results/merge", "continual.md"),
    ("unlearn", "results/unlearn", "unlearn.md")) if (REPO / results / name).is_file()]


@pytest.mark.parametrize(("command", "results", "name"), COMMITTED, ids=[c[2] for c in COMMITTED])
def test_committed_reports_rebuild_from_their_records(command, results, name, tmp_path):
    assert main([command, "--results", str(REPO / results), "--out", str(tmp_path)]) == 0
    fresh = (tmp_path / name).read_text(encoding="utf-8").replace(str(REPO) + "/", "")
    assert (REPO / results / name).read_text(encoding="utf-8") == fresh, (
        f"{results}/{name} is stale: python -m analysis {command} --results {results}")

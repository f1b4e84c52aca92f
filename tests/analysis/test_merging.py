"""The merge report (analysis/merging.py) on merge records written by hand in bench/merge.py's format."""

from __future__ import annotations

import json

import pytest

from analysis.__main__ import main
from analysis.merging import merge_rows, summary, write_merge_report
from analysis.records import NoRecordsError, load_records

MEMBERS = {"glue/sst2": ("accuracy", 0.80), "glue/mrpc": ("f1", 0.85)}


def write(results, method, merger, seed, normalized: dict[str, float], status="completed"):
    metrics, members = {}, {}
    for task, (main, individual) in MEMBERS.items():
        metrics[f"{task}/{main}"] = normalized[task] * individual
        metrics[f"{task}/individual"] = individual
        metrics[f"{task}/normalized"] = normalized[task]
        members[task] = {"run_id": f"{task}-{method}", "main_metric": main, "rebuilt": individual}
    metrics["normalized_avg"] = sum(normalized.values()) / 2
    metrics["merged_avg"] = sum(metrics[f"{t}/{m}"] for t, (m, _) in MEMBERS.items()) / 2
    metrics["individual_avg"] = sum(i for _, i in MEMBERS.values()) / 2
    run_id = f"merge-glue-{merger}__{method}__minilm__s{seed}__0000"
    record = {"id": run_id, "cell_key": f"{merger}{method}{seed}", "status": status, "task": f"merge/glue/{merger}",
              "method": method, "model": "minilm", "seed": seed, "metrics": metrics, "members": members,
              "main_metric": "normalized_avg", "merge": {"merger": merger, "scale": 1.0, "density": 0.2},
              "timestamps": {"finished": "2026-12-07T00:00:00+00:00"}}
    (results / "runs" / run_id).mkdir(parents=True)
    (results / "runs" / run_id / "record.json").write_text(json.dumps(record))


@pytest.fixture
def results(tmp_path):
    write(tmp_path, "lora", "ties", 0, {"glue/sst2": 0.9, "glue/mrpc": 0.8})
    write(tmp_path, "lora", "ties", 1, {"glue/sst2": 0.7, "glue/mrpc": 1.0})
    write(tmp_path, "lora", "average", 0, {"glue/sst2": 0.6, "glue/mrpc": 0.6})
    write(tmp_path, "full", "ties", 0, {"glue/sst2": 0.95, "glue/mrpc": 0.95})
    write(tmp_path, "full", "average", 0, {"glue/sst2": 0.1, "glue/mrpc": 0.1}, status="failed")
    return tmp_path


def test_rows_and_seed_summary(results):
    rows = merge_rows(load_records(results))
    assert len(rows) == 4  # the failed cell is left out
    table = summary(rows).set_index(["method", "merger"])
    assert table.loc[("lora", "ties"), "n"] == 2
    assert table.loc[("lora", "ties"), "normalized_avg"] == pytest.approx(0.85)
    assert table.loc[("lora", "ties"), "glue/sst2/normalized"] == pytest.approx(0.8)
    assert table.loc[("lora", "ties"), "normalized_avg std"] == pytest.approx(0.0)  # both seeds average 0.85


def test_report_names_the_best_merger_per_method_and_draws_the_figure(results, capsys):
    assert main(["merge", "--results", str(results)]) == 0
    text = (results / "merge.md").read_text()
    assert "## merge/glue on minilm" in text
    assert "lora: ties (85.0)" in text and "full: ties (95.0)" in text
    assert "85.0 ± 0.0" in text  # two seeds: mean ± std
    assert (results / "merge_normalized.png").stat().st_size > 0 and (results / "merge_normalized.pdf").is_file()
    assert "merge.md" in capsys.readouterr().out


def test_no_merge_record_is_an_error_naming_the_command(tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "record.json").write_text(json.dumps({"id": "x", "status": "completed",
                                                                      "task": "glue/sst2", "cell_key": "k"}))
    with pytest.raises(NoRecordsError, match="task=merge/glue"):
        write_merge_report(tmp_path)


def write_continual(results, method, seed, matrix):
    from tasks.continual import transfer

    tasks = ["glue/sst2", "glue/mrpc"]
    metrics = transfer(matrix, [matrix[0][0], 0.8])
    run_id = f"continual-glue__{method}__minilm__s{seed}__0000"
    record = {"id": run_id, "cell_key": f"c{method}{seed}", "status": "completed", "task": "continual/glue",
              "method": method, "model": "minilm", "seed": seed, "metrics": metrics, "matrix": matrix,
              "stages": [{"task": t} for t in tasks], "timestamps": {"finished": "2026-12-07T00:00:00+00:00"}}
    (results / "runs" / run_id).mkdir(parents=True)
    (results / "runs" / run_id / "record.json").write_text(json.dumps(record))


def test_continual_report_gives_transfer_and_the_score_matrix(tmp_path, capsys):
    write_continual(tmp_path, "lora", 0, [[0.9, None], [0.7, 0.85]])
    write_continual(tmp_path, "lora", 1, [[0.9, None], [0.5, 0.85]])
    assert main(["continual", "--results", str(tmp_path)]) == 0
    text = (tmp_path / "continual.md").read_text()
    assert "## glue/sst2 → glue/mrpc on minilm" in text
    assert "-30.0 ± 14.1" in text  # bwt: (0.7 − 0.9, 0.5 − 0.9) over two seeds
    assert "| after glue/mrpc | 70.0        | 85.0        |" in text

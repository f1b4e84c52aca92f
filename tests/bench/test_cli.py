"""The command line: the users' `+group=` form, the override form, suites, and the embedded default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.__main__ import normalize_argv
from tests.helpers import REPO

GLUE = ["glue/cola", "glue/sst2", "glue/mrpc", "glue/stsb", "glue/qnli", "glue/rte", "glue/mnli", "glue/qqp"]


def test_plus_form_equals_override_form():
    assert normalize_argv(["+method=dora", "+task=glue/rte", "+model=minilm", "-m"]) == \
        ["--multirun", "method=dora", "task=glue/rte", "model=minilm"]
    assert normalize_argv(["+experiment=smoke", "++train.max_steps=3"]) == ["+experiment=smoke", "++train.max_steps=3"]


def test_suite_expands_and_asks_for_multirun():
    assert normalize_argv(["+task=glue"]) == ["--multirun", "task=" + ",".join(GLUE)]


def test_multirun_flag_may_stand_between_overrides():
    assert normalize_argv(["+experiment=smoke", "-m", "seed=1"]) == ["--multirun", "+experiment=smoke", "seed=1"]
    assert normalize_argv(["task=glue/sst2,glue", "-m"]) == ["--multirun", "task=" + ",".join(["glue/sst2", *GLUE])]
    assert normalize_argv(["task=glue/sst2"]) == ["task=glue/sst2"]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", "+experiment=smoke", "+model=tiny_bert",
                           f"results_dir={tmp_path}", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*/record.json"))]


def test_users_form_and_override_form_run_the_same_cell(tmp_path):
    users = bench(tmp_path, "+method=lora", "+task=glue/rte", "-m")
    assert users.returncode == 0, users.stderr[-2000:]
    override = bench(tmp_path, "method=lora", "task=glue/rte")
    assert override.returncode == 0, override.stderr[-2000:]
    (record,) = records(tmp_path)  # the second command found the first one's completed cell
    assert record["status"] == "completed" and record["method"] == "lora" and record["task"] == "glue/rte"
    assert "skip" in override.stderr + override.stdout


def test_glue_suite_runs_every_subtask_and_summarises(tmp_path):
    # hydra/launcher=basic runs the 8 cells in this one process (the default `local` launcher's process per cell is
    # covered by the other grid tests): the test checks the suite's expansion and summary, not process isolation
    out = bench(tmp_path, "+method=lora", "+task=glue", "hydra/launcher=basic")
    assert out.returncode == 0, out.stderr[-2000:]
    recs = records(tmp_path)
    assert sorted(r["task"] for r in recs) == sorted(GLUE)
    assert all(r["status"] == "completed" and r["suite"] == "glue" for r in recs)
    assert "grid summary: 8 cells: 8 completed" in out.stdout
    heldout = {r["task"] for r in recs if r["eval_split"] == "heldout_from_train"}
    assert heldout == {"glue/mnli", "glue/qqp"}
    assert all("held out" in r["eval_note"] for r in recs if r["task"] in heldout)


def test_a_failing_cell_does_not_stop_the_grid(tmp_path):
    out = bench(tmp_path, "method=lora", "task=glue/rte", "method.r=0,4", "-m")
    assert out.returncode == 1
    statuses = sorted(r["status"] for r in records(tmp_path))
    assert statuses == ["completed", "failed"]
    assert "1 completed, 1 failed" in out.stdout and "rank r must be >= 1" in out.stdout


def test_unknown_method_names_the_options(tmp_path):
    out = bench(tmp_path, "+method=no_such_method")
    assert out.returncode != 0
    assert out.returncode == 2 and out.stderr.startswith("error: unknown method 'no_such_method'")
    assert "options: " in out.stderr and "lora" in out.stderr

"""Every method × every task composes and completes `+experiment=smoke` on a tiny random BERT.

Parametrised over conf/method/*.yaml and conf/task/**/*.yaml: a new YAML is covered the day it lands.
"""

from __future__ import annotations

import math

import pytest

from bench.run import run
from tests.helpers import METHODS, TASKS, compose_cfg


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_cell_runs_smoke(method, task, tmp_path):
    cfg = compose_cfg([f"method={method}", f"task={task}", "model=tiny_bert", "+experiment=smoke",
                       f"results_dir={tmp_path}", "record.save_delta=false"])
    record = run(cfg)
    assert record["status"] == "completed", record["error"]
    assert (record["method"], record["task"]) == (method, task)
    score = record["metrics"][record["main_metric"]]
    assert isinstance(score, float) and (math.isnan(score) or -1.0 <= score <= 1.0)
    assert record["params"]["trainable"] > 0 and record["curve"][-1]["step"] == cfg.train.max_steps

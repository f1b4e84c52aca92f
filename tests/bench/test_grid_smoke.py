"""Every method × every task composes and completes `+experiment=smoke` on a tiny random model (a BERT, or a
Llama for the generative tasks).

Parametrised over conf/method/*.yaml and conf/task/**/*.yaml: a new YAML is covered the day it lands.
"""

from __future__ import annotations

import math

import pytest

from bench.run import run
from tests.helpers import METHODS, TASKS, compose_cfg, tiny_model_for


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_cell_runs_smoke(method, task, tmp_path):
    model = tiny_model_for(task)
    generative = ["task.max_new_tokens=8", "task.max_eval_samples=4"] if model == "tiny_llama" else []  # seconds
    cfg = compose_cfg([f"method={method}", f"task={task}", f"model={model}", "+experiment=smoke",
                       f"results_dir={tmp_path}", "record.save_delta=false", *generative])
    record = run(cfg)
    assert record["status"] == "completed", record["error"]
    assert (record["method"], record["task"]) == (method, task)
    score = record["metrics"][record["main_metric"]]
    assert isinstance(score, float) and (math.isnan(score) or -1.0 <= score <= 1.0)
    assert record["params"]["trainable"] > 0 and record["curve"][-1]["step"] == cfg.train.max_steps

"""Continual learning (tasks/continual.py, bench/continual.py, train.init_from): the transfer metrics on a hand-made
matrix, a stage that starts where the previous one ended, and a continual cell end to end on a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from bench.run import ConfigError, run
from tasks.continual import ContinualTask, transfer
from tests.helpers import compose_cfg


def test_transfer_metrics_follow_their_definitions():
    matrix = [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.7, 0.5]]
    alone = [0.9, 0.75, 0.6]
    out = transfer(matrix, alone)
    assert out["average"] == pytest.approx((0.6 + 0.7 + 0.5) / 3)
    assert out["bwt"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)  # forgetting: negative
    assert out["fwt"] == pytest.approx(((0.8 - 0.75) + (0.5 - 0.6)) / 2)


@pytest.mark.parametrize("sequence", [["glue/sst2"], ["glue/sst2", "glue/sst2"], ["glue/sst2", "merge/glue"]])
def test_a_sequence_needs_two_different_plain_tasks(sequence):
    with pytest.raises(ValueError, match="task.sequence"):
        ContinualTask(sequence)


TINY = ["model=tiny_bert", "+experiment=smoke", "progress=false"]


def test_a_stage_starts_from_the_previous_stage_and_keeps_its_own_head(tmp_path):
    first = run(compose_cfg(["method=lora", "task=glue/sst2", *TINY, f"results_dir={tmp_path}"]))
    # one step at a learning rate of 1e-12 (Adam moves each entry by about that): the stage's ΔW is what it started from
    second = run(compose_cfg(["method=lora", "task=glue/mrpc", *TINY, f"results_dir={tmp_path}",
                              f"train.init_from={first['id']}", "train.max_steps=1", "method.lr=1e-12"]))
    assert second["status"] == "completed", second["error"]
    assert second["init_from"] == {"run_id": first["id"], "task": "glue/sst2", "tensors": 2 * 13}  # A and B, 13 layers
    d1 = load_file(str(tmp_path / "runs" / first["id"] / "delta.safetensors"))
    d2 = load_file(str(tmp_path / "runs" / second["id"] / "delta.safetensors"))
    assert any(d.abs().max() > 0 for d in d1.values())
    assert all(torch.allclose(d1[n], d2[n], atol=1e-9) for n in d1)
    plain = run(compose_cfg(["method=lora", "task=glue/mrpc", *TINY, f"results_dir={tmp_path}", "train.max_steps=1"]))
    assert plain["id"] != second["id"]  # init_from is part of the cell


def test_init_from_errors_name_the_fix(tmp_path):
    first = run(compose_cfg(["method=lora", "task=glue/sst2", *TINY, f"results_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="no completed run of that id"):
        run(compose_cfg(["method=lora", "task=glue/mrpc", *TINY, f"results_dir={tmp_path}",
                         "train.init_from=glue-sst2__nope"]))
    with pytest.raises(ConfigError, match="a stage continues a run of its own method and model"):
        run(compose_cfg(["method=dora", "task=glue/mrpc", *TINY, f"results_dir={tmp_path}",
                         f"train.init_from={first['id']}"]))


def test_a_continual_cell_fills_the_matrix_from_its_stages(tmp_path):
    record = run(compose_cfg(["method=lora", "task=continual/glue", *TINY, f"results_dir={tmp_path}",
                              "task.sequence=[glue/sst2,glue/mrpc,glue/rte]"]))
    assert record["status"] == "completed", record["error"]
    stages = record["stages"]
    assert [s["init_from"] for s in stages] == [None, stages[0]["run_id"], stages[1]["run_id"]]
    assert record["alone"]["glue/sst2"] == stages[0]["run_id"]  # stage 1 is the plain cell of task 1
    m, matrix = record["metrics"], record["matrix"]
    for j, stage in enumerate(stages):
        stage_record = run(compose_cfg(["method=lora", f"task={stage['task']}", *TINY, f"results_dir={tmp_path}",
                                        *([f"train.init_from={stages[j - 1]['run_id']}"] if j else [])]))
        assert stage_record.get("skipped") and stage_record["id"] == stage["run_id"]  # the cells the store holds
        assert matrix[j][j] == pytest.approx(stage_record["metrics"][stage_record["main_metric"]], abs=1e-6)
        assert all(v is None for v in matrix[j][j + 1:])
    assert m["average"] == pytest.approx(sum(matrix[2]) / 3)
    assert m["bwt"] == pytest.approx((matrix[2][0] - matrix[0][0] + matrix[2][1] - matrix[1][1]) / 2)
    assert m["fwt"] == pytest.approx((matrix[1][1] - m["alone/glue/mrpc"] + matrix[2][2] - m["alone/glue/rte"]) / 2)
    assert m["after/glue/rte/glue/sst2"] == matrix[2][0] and record["main_metric"] == "average"

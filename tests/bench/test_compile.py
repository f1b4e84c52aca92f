"""train.compile: the model is compiled in place (names unchanged, so records, adapters and ΔW are as without it),
the run's numbers match the eager run's, and a method that cannot be compiled is refused with its reason."""

from __future__ import annotations

import pytest

from bench.run import ConfigError, run
from methods.lora import LoRA
from tests.helpers import compose_cfg

SMOKE = ["task=glue/sst2", "model=tiny_bert", "+experiment=smoke", "record.save_delta=false"]


def _run(tmp_path, *extra: str) -> dict:
    return run(compose_cfg(["method=lora", *SMOKE, f"results_dir={tmp_path}", *extra]))


# inductor draws dropout masks from its own generator, so the comparison runs without dropout
NO_DROPOUT = ["+model.config_overrides.hidden_dropout_prob=0.0",
              "+model.config_overrides.attention_probs_dropout_prob=0.0"]


@pytest.mark.parametrize("backend", ["aot_eager", "true"])  # true: inductor, what users get
def test_compiled_run_matches_the_eager_run(tmp_path, backend):
    import torch._dynamo

    torch._dynamo.reset()
    eager = _run(tmp_path / "eager", *NO_DROPOUT)
    compiled = _run(tmp_path / "compiled", f"train.compile={backend}", *NO_DROPOUT)
    assert compiled["status"] == "completed", compiled["error"]
    assert compiled["cell_key"] != eager["cell_key"]  # a compiled run is its own cell
    for a, b in zip(eager["curve"], compiled["curve"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    assert compiled["metrics"]["accuracy"] == pytest.approx(eager["metrics"]["accuracy"], abs=1e-9)
    assert compiled["params"]["trainable"] == eager["params"]["trainable"]


def test_a_method_that_cannot_be_compiled_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(LoRA, "compilable", "its hooks rebuild the layers every step", raising=False)
    with pytest.raises(ConfigError, match="cannot run under train.compile: its hooks rebuild"):
        _run(tmp_path, "train.compile=aot_eager")


def test_the_default_leaves_earlier_cells_alone():
    """train.compile was added after the committed records: at false it is not part of the cell key."""
    from bench.run import semantic_config

    assert "compile" not in semantic_config(compose_cfg(["method=lora", *SMOKE]))["train"]
    assert semantic_config(compose_cfg(["method=lora", *SMOKE, "train.compile=true"]))["train"]["compile"] is True

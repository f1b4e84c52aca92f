"""Export: a PEFT-loadable LoRA adapter wherever ΔW is low-rank (checked by loading it back), else merged."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from bench.export import low_rank_factors
from bench.run import run, seed_everything
from bench.models import load_model
from tests.helpers import compose_cfg


def test_low_rank_factors_are_exact_at_the_numerical_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 3, generator=g) @ torch.randn(3, 30, generator=g)
    b, a = low_rank_factors(delta)
    assert b.shape == (20, 3) and a.shape == (3, 30)
    torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,kind", [("lora", "peft_lora"), ("pissa", "peft_lora"), ("full", "merged")])
def test_export_loads_back_and_matches(method, kind, tmp_path):
    cfg = compose_cfg([f"method={method}", "model=tiny_bert", "+experiment=smoke", f"results_dir={tmp_path}",
                       "export=true", "method.lr=1e-2"])
    record = run(cfg)
    info = record["artifacts"]["export"]
    assert info["kind"] == kind, info["reason"]
    assert info["max_abs_diff"] < 1e-4
    folder = tmp_path / "runs" / record["id"] / "export"
    seed_everything(cfg.seed)
    loaded = load_model(cfg.model, __import__("tasks.glue", fromlist=["GlueTask"]).GlueTask("sst2").head)
    if kind == "peft_lora":
        model = PeftModel.from_pretrained(loaded.model, str(folder))  # a plain PEFT user's call
        if method == "pissa":  # ΔW = s(BA − B0A0): rank up to 2r, exported exactly
            assert max(info["ranks"].values()) <= 2 * cfg.method.r
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    batch = loaded.tokenizer(["a fine film", "a dull , lifeless mess"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.eval()(**batch).logits
    assert torch.isfinite(out).all()

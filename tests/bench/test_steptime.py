"""The side-by-side step-time benchmark: every method set up as a run, interleaved rounds, ratios to LoRA."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bench.steptime import main


def test_interleaved_rounds_give_ratios_to_lora(tmp_path: Path) -> None:
    out = tmp_path / "steptime"
    assert main(["--methods", "lora,full", "--steps", "3", "--warmup", "1", "--out", str(out),
                 "model=tiny_bert", "+experiment=smoke"]) == 0
    table = pd.read_csv(out.with_suffix(".csv")).set_index("method")
    assert list(table.index) == ["lora", "full"]
    assert table.loc["lora", "vs_lora_median"] == 1.0
    assert (table["step_s_median"] > 0).all()
    assert table.loc["full", "trainable"] > 10 * table.loc["lora", "trainable"]
    # full fine-tuning keeps two Adam moments per parameter
    assert table.loc["full", "optimizer_state_bytes"] >= 2 * 4 * table.loc["full", "trainable"]
    assert "python -m bench.steptime --methods lora,full" in out.with_suffix(".md").read_text()


def test_unknown_method_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--methods", "lora,no_such_method"])
    assert "no_such_method" in capsys.readouterr().err

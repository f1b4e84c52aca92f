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
    assert table.loc["full", "vs_lora_ci95_low"] <= table.loc["full", "vs_lora_median"] <= table.loc["full", "vs_lora_ci95_high"]
    assert (table["rounds"] == 3).all()
    assert (table["step_s_median"] > 0).all()
    assert table.loc["full", "trainable"] > 10 * table.loc["lora", "trainable"]
    # full fine-tuning keeps two Adam moments per parameter
    assert table.loc["full", "optimizer_state_bytes"] >= 2 * 4 * table.loc["full", "trainable"]
    assert "python -m bench.steptime --methods lora,full" in out.with_suffix(".md").read_text()


def test_unknown_method_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--methods", "lora,no_such_method"])
    assert "no_such_method" in capsys.readouterr().err


def test_ci_width_keeps_measuring_until_the_cap(tmp_path: Path) -> None:
    """An unreachable width (0) runs blocks of --steps rounds until the time cap; a loose one stops at --steps."""
    out = tmp_path / "steptime"
    common = ["--methods", "lora,full", "--steps", "2", "--warmup", "0", "--out", str(out), "model=tiny_bert",
              "+experiment=smoke"]
    assert main([*common, "--ci-width", "0", "--time-cap", "0.5"]) == 0
    rounds = pd.read_csv(out.with_suffix(".csv"))["rounds"]
    assert (rounds > 2).all() and (rounds % 2 == 0).all()
    assert main([*common, "--ci-width", "100"]) == 0
    assert (pd.read_csv(out.with_suffix(".csv"))["rounds"] == 2).all()

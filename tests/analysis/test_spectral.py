"""Spectral measures on matrices with known answers; spectral_frame, the base-weight reload and the analysis
CLI (spectral, intruders --mitigate, figure) on tiny real records made by `python -m bench +experiment=smoke`."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.__main__ import main
from analysis.spectral import (
    effective_rank,
    energy_top_k,
    layer_statistics,
    numerical_rank,
    spectral_analysis,
    spectral_frame,
    subspace_alignment,
)
from analysis.weights import (
    MissingDeltaError,
    NoRecordsError,
    load_adapter,
    load_base_weights,
    load_deltas,
    records_with_deltas,
)

REPO = Path(__file__).resolve().parents[2]


def tiny_results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results dir with two completed smoke runs on the random tiny BERT (LoRA r=8 and full fine-tuning),
    each with record.json, delta.safetensors and adapter.safetensors. Made once per test session (~15 s)."""
    results = tmp_path_factory.getbasetemp() / "tiny_results"
    if not (results / "runs").is_dir():
        proc = subprocess.run(
            [sys.executable, "-m", "bench", "+experiment=smoke", "model=tiny_bert", "method=lora,full",
             "hydra/launcher=basic", f"results_dir={results}", "-m"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_results_dir(tmp_path_factory)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


# ---------------------------------------------------------------------------------------------- measures


@pytest.mark.parametrize("r", [1, 3, 8])
def test_effective_rank_of_rank_r_with_equal_singular_values_is_r(r: int) -> None:
    delta = orthonormal(50, r, 0) @ (2.5 * torch.eye(r)) @ orthonormal(30, r, 1).T  # (50, 30), rank r
    s = torch.linalg.svdvals(delta)
    assert effective_rank(s) == pytest.approx(r, rel=1e-4)
    assert numerical_rank(s, delta.shape) == r


def test_effective_rank_is_between_one_and_the_rank() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 0.0])
    assert 1.0 < effective_rank(s) < 3.0
    assert effective_rank(torch.tensor([3.0])) == pytest.approx(1.0)
    assert math.isnan(effective_rank(torch.zeros(5)))
    p = np.array([4, 2, 1]) / 7
    assert effective_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_energy_top_k() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])  # energies 9, 4, 1, 1 of 15
    assert energy_top_k(s, 1) == pytest.approx(9 / 15)
    assert energy_top_k(s, 2) == pytest.approx(13 / 15)
    assert energy_top_k(s, 10) == pytest.approx(1.0)
    assert energy_top_k(torch.tensor([1.0, 3.0]), 1) == pytest.approx(0.9)  # any order
    assert math.isnan(energy_top_k(torch.zeros(3), 2))


def test_alignment_is_one_inside_w0_top_subspace_and_zero_outside() -> None:
    m, n, k = 40, 30, 4
    u0 = orthonormal(m, n, 2)  # (m, n): W0's left singular vectors
    w0 = u0 @ torch.diag(torch.linspace(10, 1, n)) @ orthonormal(n, n, 3).T  # (m, n)
    w0_u = torch.linalg.svd(w0, full_matrices=False)[0]  # (m, n), sorted like u0
    mix = orthonormal(k, k, 4)  # a rotation inside the top-k subspace
    inside = w0_u[:, :k] @ mix @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ orthonormal(n, k, 5).T
    stats, _ = layer_statistics(inside, w0_u, float(w0.norm()), k=k)
    assert stats["alignment"] == pytest.approx(1.0, abs=1e-5)
    assert stats["k_align"] == k
    outside = w0_u[:, k : 2 * k] @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])) @ orthonormal(n, k, 6).T
    stats, _ = layer_statistics(outside, w0_u, float(w0.norm()), k=k)
    assert stats["alignment"] == pytest.approx(0.0, abs=1e-6)
    assert stats["energy_top_k"] == pytest.approx(1.0)
    assert stats["rel_norm"] == pytest.approx(float(outside.norm() / w0.norm()), rel=1e-5)
    half = subspace_alignment(torch.cat([w0_u[:, :1], w0_u[:, k : k + 1]], 1), w0_u, 2)
    assert half == pytest.approx(0.5, abs=1e-5)


def test_alignment_uses_at_most_the_rank_of_delta() -> None:
    w0_u = orthonormal(20, 20, 7)
    delta = 3.0 * torch.outer(w0_u[:, 0], orthonormal(10, 1, 8)[:, 0])  # rank 1
    stats, s = layer_statistics(delta, w0_u, 1.0, k=8)
    assert stats["k_align"] == 1
    assert stats["numerical_rank"] == 1
    assert stats["alignment"] == pytest.approx(1.0, abs=1e-5)
    assert s.shape == (10,)


# ---------------------------------------------------------------------------------------------- real records


def test_base_weights_reproduce_the_runs_w0(tiny_results: Path) -> None:
    """For full fine-tuning the adapter file holds the fine-tuned W: reloaded W0 + ΔW must equal it."""
    (record, run_dir), = [(r, d) for r, d in records_with_deltas(tiny_results) if r["method"] == "full"]
    deltas = load_deltas(run_dir)
    w0 = load_base_weights(record, deltas)
    adapter = load_adapter(run_dir)
    for name, delta in deltas.items():
        torch.testing.assert_close(w0[name] + delta, adapter[f"{name}.weight"], atol=1e-6, rtol=0)


def test_spectral_frame_on_real_records(tiny_results: Path) -> None:
    frame = spectral_frame(tiny_results, k=4)
    assert set(frame["method"]) == {"full", "lora"}
    assert frame.groupby("id")["layer"].nunique().min() >= 12
    lora, full = frame[frame["method"] == "lora"], frame[frame["method"] == "full"]
    assert (lora["numerical_rank"] <= 8).all() and (lora["r"] == 8).all()
    assert full["r"].isna().all()
    assert (frame["effective_rank"] >= 1).all()
    assert frame["energy_top_k"].between(0, 1 + 1e-9).all()
    assert frame["alignment"].between(0, 1 + 1e-6).all()
    assert (frame["k"] == 4).all()
    assert frame["block"].dropna().isin([0, 1]).all()
    result = spectral_analysis(tiny_results, k=4)
    assert len(result.spectra) == len(result.frame)


def test_missing_delta_file_is_a_clear_error(tmp_path: Path, tiny_results: Path) -> None:
    import shutil

    results = tmp_path / "results"
    shutil.copytree(tiny_results / "runs", results / "runs", ignore=shutil.ignore_patterns("delta.safetensors"))
    with pytest.raises(MissingDeltaError, match="record.save_delta=true"):
        records_with_deltas(results)
    run_dir = next((results / "runs").iterdir())
    with pytest.raises(MissingDeltaError, match="record.save_delta=true"):
        load_deltas(run_dir)
    assert main(["spectral", "--results", str(results)]) == 1
    with pytest.raises(NoRecordsError):
        records_with_deltas(tmp_path / "empty")


def test_cli_spectral_and_intruders(tiny_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "analysis"
    assert main(["spectral", "--results", str(tiny_results), "--out", str(out), "--k", "4"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA r=8" in printed and "Full FT" in printed
    frame = pd.read_csv(out / "spectral.csv")
    assert len(frame) >= 24
    for stem in ("spectrum", "spectral_layers"):
        assert (out / f"{stem}.png").stat().st_size > 10_000
        assert (out / f"{stem}.pdf").stat().st_size > 1_000

    argv = ["intruders", "--results", str(tiny_results), "--out", str(out), "--mitigate", "--lambdas", "1,0",
            "--eval-limit", "16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "ε=0.5" in printed
    intruders = pd.read_csv(out / "intruders.csv")
    assert {"id", "layer", "eps", "intruders", "method", "r", "seed"} <= set(intruders.columns)
    totals = pd.read_csv(out / "intruders_total.csv")
    assert totals["id"].nunique() == 2
    mitigation = pd.read_csv(out / "mitigation.csv")
    assert sorted(mitigation["lam"].unique()) == [0.0, 1.0]
    assert {"score", "sts_spearman", "forgetting"} <= set(mitigation.columns)
    for stem in ("intruders_vs_rank", "intruders_vs_eps", "intruder_mitigation"):
        assert (out / f"{stem}.png").stat().st_size > 10_000
        assert (out / f"{stem}.pdf").exists()


def test_cli_default_out_is_under_results(tiny_results: Path, tmp_path: Path) -> None:
    import shutil

    results = tmp_path / "results"
    shutil.copytree(tiny_results / "runs", results / "runs")
    assert main(["spectral", "--results", str(results)]) == 0
    assert (results / "analysis" / "spectral.csv").is_file()


def test_cli_figure(tiny_results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("analysis.figures")
    assert main(["figure", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "intruders_vs_rank" in listed and "spectrum" in listed
    out = tmp_path / "figures"
    assert main(["figure", "intruders_vs_eps", "--results", str(tiny_results), "--out", str(out)]) == 0
    assert (out / "intruders_vs_eps.png").is_file() and (out / "intruders_vs_eps.pdf").is_file()
    assert main(["figure", "no_such_figure", "--results", str(tiny_results)]) == 2


def test_cli_figure_all_renders_what_it_can_and_names_what_failed(tiny_results: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from analysis import figures

    out = tmp_path / "figures"
    rc = main(["figure", "all", "--results", str(tiny_results), "--out", str(out)])
    err = capsys.readouterr().err
    failed = {name for name in figures.FIGURES if f"error: {name}:" in err}
    assert (rc == 0) == (not failed)
    assert "intruders_vs_eps" not in failed and (out / "intruders_vs_eps.png").is_file()
    assert len(failed) < len(figures.FIGURES)


def test_cli_no_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["intruders", "--results", str(tmp_path)]) == 1
    assert "no run records" in capsys.readouterr().err

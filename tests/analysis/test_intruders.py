"""Intruder dimensions on matrices with known answers, the truncated SVD against the full one, mitigation,
and the frames on the tiny real records made by tests/analysis/test_spectral.py's fixture."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.intruders import (
    EPS_GRID,
    count_intruders,
    count_intruders_grid,
    intruder_components,
    intruder_frame,
    intruder_similarities,
    intruder_totals,
    mitigate,
    mitigation_frame,
    top_singular,
)
from analysis.weights import base_svd, load_base_weights, load_deltas, records_with_deltas
from tests.analysis.test_spectral import tiny_results_dir

M, N, K = 40, 20, 10
SIGMA = torch.linspace(10.0, 1.0, N)  # distinct singular values, gaps ≈ 0.47


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, cols) with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q


def base_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 = U diag(σ) Vᵀ (M × N, M > N) and an extra unit vector z in the orthogonal complement of span(U)."""
    gen = torch.Generator().manual_seed(seed)
    basis = orthonormal(M, N + 1, gen)  # (M, N+1)
    u, z = basis[:, :N], basis[:, N]  # (M, N), (M,)
    v = orthonormal(N, N, gen)  # (N, N)
    w0 = u @ torch.diag(SIGMA.double()) @ v.T  # (M, N)
    return w0.float(), u.float(), v.float(), z.float()


def one_intruder() -> tuple[torch.Tensor, torch.Tensor]:
    """W = W0 + 20·z·v_minᵀ: v_min (W0's weakest right vector) stays a right singular vector, now with
    σ = √(1 + 400) ≈ 20.02, the largest, and left vector (u_min + 20 z)/σ, whose largest |cos| with W0's left
    vectors is 1/σ ≈ 0.05. Every other top singular triplet is W0's: exactly one intruder for any ε > 0.05."""
    w0, _, v, z = base_case()
    w = w0 + 20.0 * torch.outer(z, v[:, -1])  # (M, N)
    return w0, w


# ---------------------------------------------------------------------------------------------- counts


def test_constructed_update_outside_the_column_space_is_exactly_one_intruder() -> None:
    w0, w = one_intruder()
    sims = intruder_similarities(w0, w, K)
    assert sims.shape == (K,)
    assert sims[0] == pytest.approx(1 / np.sqrt(401), abs=1e-4)  # the new top direction
    assert torch.all(sims[1:] > 0.999)
    for eps in (0.1, 0.3, 0.5, 0.9):
        assert count_intruders(w0, w, K, eps) == 1
        assert count_intruders(w0, w, K, eps, exact=True) == 1
    assert count_intruders(w0, w, K, 0.01) == 0  # below the new direction's 0.05


def test_small_update_inside_the_subspace_has_no_intruder() -> None:
    w0, u, v, _ = base_case()
    gen = torch.Generator().manual_seed(1)
    delta = u @ (0.01 * torch.randn(N, N, generator=gen)) @ v.T  # (M, N), in W0's row and column spaces
    w = w0 + delta
    assert intruder_similarities(w0, w, K).min() > 0.99
    assert count_intruders(w0, w, K, 0.9) == 0


def test_zero_update_has_no_intruder() -> None:
    w0, *_ = base_case()
    assert count_intruders(w0, w0.clone(), K, 0.9) == 0
    assert count_intruders(w0, w0.clone(), K, 0.9, exact=True) == 0
    np.testing.assert_array_equal(count_intruders_grid(w0, w0.clone(), K), np.zeros(len(EPS_GRID)))


def test_grid_counts_are_monotone_in_eps_and_match_single_counts() -> None:
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(48, 32, generator=gen)
    w = w0 + 0.8 * torch.randn(48, 32, generator=gen)  # a large update: many intruders at high ε
    grid = np.linspace(0.05, 0.95, 19)
    counts = count_intruders_grid(w0, w, K, grid)
    assert np.all(np.diff(counts) >= 0)
    assert counts[-1] > counts[0]
    assert [count_intruders(w0, w, K, e) for e in grid] == counts.tolist()


@pytest.mark.parametrize("shape", [(30, 30), (50, 20), (20, 50), (64, 64), (96, 32)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truncated_svd_gives_the_full_svd_counts_on_random_matrices(shape: tuple[int, int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(*shape, generator=gen)
    w = w0 + 0.5 * torch.randn(*shape, generator=gen) + 3.0 * torch.outer(
        torch.randn(shape[0], generator=gen), torch.randn(shape[1], generator=gen)) / np.sqrt(shape[0] * shape[1])
    fast = intruder_similarities(w0, w, K)
    full = intruder_similarities(w0, w, K, exact=True)
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(count_intruders_grid(w0, w, K), count_intruders_grid(w0, w, K, exact=True))


def test_top_singular_matches_the_full_svd() -> None:
    gen = torch.Generator().manual_seed(3)
    for shape in [(40, 25), (25, 40)]:
        w = torch.randn(*shape, generator=gen)
        top = top_singular(w, 6)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(top.s, s[:6], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close((top.u * u[:, :6]).sum(0).abs(), torch.ones(6), atol=1e-4, rtol=0)
        torch.testing.assert_close((top.v * vh[:6].T).sum(0).abs(), torch.ones(6), atol=1e-4, rtol=0)
        torch.testing.assert_close(top.product(), (u[:, :6] * s[:6]) @ vh[:6], atol=1e-4, rtol=0)


def test_truncated_svd_on_a_rank_deficient_matrix_falls_back_and_agrees() -> None:
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(30, 20, generator=gen)
    w = torch.randn(30, 3, generator=gen) @ torch.randn(3, 20, generator=gen)  # rank 3 < k
    np.testing.assert_array_equal(count_intruders_grid(w0, w, K), count_intruders_grid(w0, w, K, exact=True))


def test_k_larger_than_the_matrix_is_clipped() -> None:
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(12, 6, generator=gen)
    assert intruder_similarities(w0, w0 + torch.randn(12, 6, generator=gen), k=10).shape == (6,)


# ---------------------------------------------------------------------------------------------- mitigation


def test_mitigation_with_lambda_one_returns_w() -> None:
    w0, w = one_intruder()
    torch.testing.assert_close(mitigate(w0, w, 1.0, K, 0.5), w)


def test_mitigation_with_lambda_zero_removes_the_intruder() -> None:
    w0, w = one_intruder()
    w_lam = mitigate(w0, w, 0.0, K, 0.5)
    assert count_intruders(w0, w_lam, K, 0.5) == 0
    assert count_intruders(w0, w_lam, K, 0.5, exact=True) == 0
    # what is left is W0 without its weakest direction (σ = 1), which the update had rotated away
    _, u, v, _ = base_case()
    expected = w0 - torch.outer(u[:, -1], v[:, -1])
    torch.testing.assert_close(w_lam, expected, atol=1e-4, rtol=0)


def test_mitigation_scales_the_intruder_component_linearly() -> None:
    w0, w = one_intruder()
    intruders = intruder_components(w0, w, K, 0.5)
    assert intruders.s.numel() == 1
    component = intruders.product()  # (M, N)
    torch.testing.assert_close(mitigate(w0, w, 0.25, K, 0.5), w - 0.75 * component, atol=1e-5, rtol=0)
    top = torch.linalg.svdvals(mitigate(w0, w, 0.5, K, 0.5))
    assert top[0] == pytest.approx(max(0.5 * np.sqrt(401), 10.0), rel=1e-4)


def test_mitigation_without_intruders_is_the_identity() -> None:
    w0, u, v, _ = base_case()
    w = w0 + u @ (0.01 * torch.eye(N)) @ v.T
    torch.testing.assert_close(mitigate(w0, w, 0.0, K, 0.5), w)


# ---------------------------------------------------------------------------------------------- real records


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory):
    return tiny_results_dir(tmp_path_factory)


def test_truncated_matches_full_svd_on_real_deltas(tiny_results) -> None:
    pairs = records_with_deltas(tiny_results)
    assert {record["method"] for record, _ in pairs} == {"full", "lora"}
    layers = 0
    for record, run_dir in pairs:
        deltas = load_deltas(run_dir)
        w0 = load_base_weights(record, deltas)
        for name, delta in deltas.items():
            w = w0[name] + delta
            fast = count_intruders_grid(None, w, K, base_u=base_svd(record, name).u)
            full = count_intruders_grid(w0[name], w, K, exact=True)
            np.testing.assert_array_equal(fast, full, err_msg=f"{record['id']} {name}")
            layers += 1
    assert layers >= 2 * 12


def test_intruder_frame_on_real_records(tiny_results) -> None:
    frame = intruder_frame(tiny_results, k=K)
    runs = frame["id"].nunique()
    layers = frame.groupby("id")["layer"].nunique()
    assert runs == 2
    assert len(frame) == int(layers.sum()) * len(EPS_GRID)
    assert {"id", "method", "r", "seed", "task", "model", "layer", "eps", "intruders"} <= set(frame.columns)
    assert frame.loc[frame["method"] == "lora", "r"].eq(8).all()
    assert frame.loc[frame["method"] == "full", "r"].isna().all()
    assert frame["intruders"].between(0, K).all()
    totals = intruder_totals(frame)
    for _, run in totals.groupby("id"):
        assert run.sort_values("eps")["intruders"].is_monotonic_increasing


def test_mitigation_frame_rebuilds_the_recorded_score(tiny_results) -> None:
    for record, run_dir in records_with_deltas(tiny_results):
        frame = mitigation_frame(record, lambdas=(1.0, 0.0), run_dir=run_dir, probe_rows=64)
        assert list(frame["lam"]) == [1.0, 0.0]
        first = frame.iloc[0]
        # λ = 1 is the fine-tuned model: the rebuilt classifier scores what the run recorded (32 eval rows)
        assert first["score"] == pytest.approx(first["score_recorded"], abs=1 / 32 + 1e-9), record["id"]
        assert np.isfinite(frame["sts_spearman"]).all()
        assert frame["forgetting"].equals(frame["sts_spearman_base"] - frame["sts_spearman"])
        assert isinstance(frame, pd.DataFrame)


def test_mitigation_frame_accepts_a_run_directory(tiny_results) -> None:
    (record, run_dir), *_ = records_with_deltas(tiny_results)
    frame = mitigation_frame(run_dir, lambdas=(1.0,), probe_rows=32)
    assert frame["id"].iloc[0] == record["id"]

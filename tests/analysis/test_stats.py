"""Significance tests of analysis.stats on constructed data with known answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.stats import (
    Comparison,
    above_floor,
    cd_diagram,
    critical_difference,
    friedman,
    holm,
    nemenyi,
    paired_bootstrap,
    significance_mark,
    welch,
)

N_BOOT = 2000


def _standardized(n: int, seed: int) -> np.ndarray:
    """n draws rescaled to sample mean exactly 0 and sample sd (ddof=1) exactly 1."""
    z = np.random.default_rng(seed).normal(size=n)
    return (z - z.mean()) / z.std(ddof=1)


def _welch_by_hand(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Textbook Welch t, Welch–Satterthwaite df, and standard error."""
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    t = (a.mean() - b.mean()) / se
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    return t, df, se


# ---------------------------------------------------------------------------
# Welch


def test_welch_ten_standard_errors_apart_is_significant_and_ci_covers_the_difference() -> None:
    sd_a, sd_b = 0.5, 2.0
    a0, b0 = sd_a * _standardized(5, 1), sd_b * _standardized(6, 2)
    se = math.sqrt(sd_a**2 / 5 + sd_b**2 / 6)
    true_diff = 10 * se
    a, b = 70.0 + true_diff + a0, 70.0 + b0

    cmp = welch(a, b)
    assert cmp.test == "welch" and (cmp.n_a, cmp.n_b) == (5, 6)
    assert cmp.diff == pytest.approx(true_diff, rel=1e-12)
    assert cmp.p < 1e-3
    assert 0 < cmp.ci_low < true_diff < cmp.ci_high  # excludes 0, oriented as a − b
    # swapping the sides flips the sign of the difference and the interval, not the p-value
    rev = welch(b, a)
    assert rev.diff == pytest.approx(-cmp.diff) and rev.p == pytest.approx(cmp.p)
    assert (rev.ci_low, rev.ci_high) == pytest.approx((-cmp.ci_high, -cmp.ci_low))


def test_welch_same_distribution_is_not_significant() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(80, 1, size=5), rng.normal(80, 1, size=5)
    cmp = welch(a, b)
    assert cmp.p > 0.05
    assert cmp.ci_low < 0 < cmp.ci_high


def test_welch_matches_welch_satterthwaite_by_hand() -> None:
    a = np.array([81.2, 79.8, 80.5, 82.1])
    b = np.array([78.0, 80.9, 76.5, 79.2, 81.7, 77.3])
    t, df, se = _welch_by_hand(a, b)
    p = 2 * stats.t.sf(abs(t), df)
    half = stats.t.ppf(0.95, df) * se  # 90% interval

    cmp = welch(a, b, level=0.90)
    assert cmp.p == pytest.approx(p, abs=1e-10, rel=0)
    assert cmp.diff == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert cmp.ci_low == pytest.approx(a.mean() - b.mean() - half, abs=1e-10)
    assert cmp.ci_high == pytest.approx(a.mean() - b.mean() + half, abs=1e-10)


def test_welch_single_run_is_nan() -> None:
    cmp = welch([80.0], [79.0, 81.0, 80.0])
    assert math.isnan(cmp.p) and math.isnan(cmp.ci_low) and math.isnan(cmp.ci_high)
    assert cmp.diff == pytest.approx(0.0)
    assert significance_mark(cmp) == "n/a"


def test_welch_drops_nans() -> None:
    a, b = [81.0, np.nan, 80.0, 82.0], [78.0, 79.0, np.nan, 77.5]
    cmp = welch(a, b)
    ref = welch([81.0, 80.0, 82.0], [78.0, 79.0, 77.5])
    assert (cmp.n_a, cmp.n_b) == (3, 3)
    assert cmp == ref and not math.isnan(cmp.p)
    assert math.isnan(welch([1.0, np.nan], [2.0, 3.0]).p)  # one value left


def test_welch_zero_variance_cases() -> None:
    differ = welch([0.83] * 4, [0.81] * 3)  # deterministic runs that differ
    assert differ.p == 0.0
    assert differ.ci_low == differ.ci_high == differ.diff == pytest.approx(0.02)
    assert significance_mark(differ) == ""

    # equal constants: no evidence either way. 0.1 is not exact in binary: scipy alone gives p ≈ 0.29 here.
    same = welch([0.1] * 3, [0.1] * 5)
    assert same.diff == 0.0
    assert math.isnan(same.p) and math.isnan(same.ci_low) and math.isnan(same.ci_high)

    one_side = welch([0.5] * 4, [0.4, 0.6, 0.5, 0.55])  # only one side constant: an ordinary test
    assert 0.0 < one_side.p < 1.0 and one_side.ci_low < one_side.ci_high


# ---------------------------------------------------------------------------
# Paired bootstrap


def _flipped(n: int = 1000, k: int = 30, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = (rng.random(n) < 0.8).astype(float)
    b = a.copy()
    b[rng.choice(np.flatnonzero(a == 1), size=k, replace=False)] = 0.0
    return a, b


def test_paired_bootstrap_consistent_flips_are_significant() -> None:
    a, b = _flipped()
    cmp = paired_bootstrap(a, b, n_boot=N_BOOT, seed=0)
    assert cmp.test == "paired_bootstrap" and (cmp.n_a, cmp.n_b) == (1000, 1000)
    assert cmp.diff == 0.03
    assert 0 < cmp.ci_low <= 0.03 <= cmp.ci_high
    assert cmp.p < 0.01
    assert significance_mark(cmp) == ""


def test_paired_bootstrap_identical_is_p_one() -> None:
    a, _ = _flipped()
    cmp = paired_bootstrap(a, a.copy(), n_boot=N_BOOT)
    assert cmp.diff == 0.0 and cmp.p == 1.0
    assert cmp.ci_low == cmp.ci_high == 0.0
    assert significance_mark(cmp) == "n.s."


def test_paired_bootstrap_unpaired_noise_is_not_significant() -> None:
    """Same 0.03 gap in accuracy as the flipped case, but a and b disagree at random: not significant."""
    rng = np.random.default_rng(11)
    n = 1000
    a, b = np.zeros(n), np.zeros(n)
    a[rng.permutation(n)[:530]] = 1.0
    b[rng.permutation(n)[:500]] = 1.0
    cmp = paired_bootstrap(a, b, n_boot=N_BOOT)
    assert cmp.diff == pytest.approx(0.03, abs=1e-15)
    assert cmp.p > 0.05
    assert cmp.ci_low < 0 < cmp.ci_high

    c = np.zeros(n)
    c[rng.permutation(n)[:530]] = 1.0  # independent of a, equal mean
    equal = paired_bootstrap(a, c, n_boot=N_BOOT)
    assert equal.diff == 0.0 and equal.p > 0.05


def test_paired_bootstrap_seeded_and_two_dimensional() -> None:
    a, b = _flipped()
    first, again = paired_bootstrap(a, b, n_boot=500, seed=5), paired_bootstrap(a, b, n_boot=500, seed=5)
    assert (first.ci_low, first.ci_high, first.p) == (again.ci_low, again.ci_high, again.p)

    # (n_seeds, n_examples): seeds are averaged per example before the paired difference
    a2 = np.stack([a, a, np.roll(a, 1)])
    b2 = np.stack([b, b])
    cmp = paired_bootstrap(a2, b2, n_boot=500)
    assert cmp.n_a == 1000
    assert cmp.diff == pytest.approx(a2.mean() - b2.mean(), abs=1e-12)
    with pytest.raises(ValueError, match="different numbers of examples"):
        paired_bootstrap(a, b[:-1], n_boot=10)


# ---------------------------------------------------------------------------
# Holm


def test_holm_known_values_and_nan_passthrough() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # p sorted 0.005, 0.01, 0.03, 0.2 → ×4, ×3, ×2, ×1, running max, capped at 1
    assert holm([0.2, 0.005, 0.03, 0.01]) == pytest.approx([0.2, 0.02, 0.06, 0.03])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])

    out = holm([0.01, np.nan, 0.03])  # NaN is not part of the family: m = 2, not 3
    assert math.isnan(out[1])
    assert [out[0], out[2]] == pytest.approx([0.02, 0.03])
    assert all(math.isnan(v) for v in holm([np.nan, np.nan]))
    assert holm([]) == []


# ---------------------------------------------------------------------------
# Friedman, Nemenyi, CD diagram


def _dominant(n_tasks: int = 8) -> pd.DataFrame:
    """A beats B beats C on every task, on task-specific scales."""
    rng = np.random.default_rng(0)
    base = rng.uniform(40, 90, size=n_tasks)
    gap = rng.uniform(0.5, 3.0, size=(n_tasks, 2))
    return pd.DataFrame(
        {"A": base + gap[:, 0] + gap[:, 1], "B": base + gap[:, 1], "C": base},
        index=[f"task{i}" for i in range(n_tasks)],
    )


def test_friedman_dominant_method() -> None:
    res = friedman(_dominant())
    assert list(res.mean_ranks.index) == ["A", "B", "C"]
    assert res.mean_ranks.tolist() == [1.0, 2.0, 3.0]
    assert (res.n_blocks, res.n_methods) == (8, 3)
    assert res.statistic == pytest.approx(16.0)  # 12N/(k(k+1)) Σ R_j² − 3N(k+1) with R = 1, 2, 3
    assert res.p < 0.01
    assert res.dropped_blocks == [] and res.reason is None


def test_friedman_lower_is_better_flips_ranks() -> None:
    res = friedman(_dominant(), higher_is_better=False)
    assert list(res.mean_ranks.index) == ["C", "B", "A"]
    assert res.mean_ranks.tolist() == [1.0, 2.0, 3.0]


def test_friedman_ties_share_the_average_rank() -> None:
    scores = pd.DataFrame({"A": [3.0, 3.0], "B": [3.0, 2.0], "C": [1.0, 1.0]})
    res = friedman(scores)
    assert res.mean_ranks.to_dict() == {"A": 1.25, "B": 1.75, "C": 3.0}


def test_friedman_iid_noise_is_not_significant() -> None:
    rng = np.random.default_rng(2024)
    scores = pd.DataFrame(rng.normal(size=(6, 3)), columns=["A", "B", "C"])
    res = friedman(scores)
    assert res.p > 0.05
    assert res.mean_ranks.sum() == pytest.approx(6.0)  # 1 + 2 + 3 on average


def test_friedman_drops_rows_with_nan() -> None:
    scores = _dominant()
    scores.loc["task3", "B"] = np.nan
    res = friedman(scores)
    assert res.dropped_blocks == ["task3"]
    assert res.n_blocks == 7
    assert res.mean_ranks.tolist() == [1.0, 2.0, 3.0]
    assert res.p == pytest.approx(stats.friedmanchisquare(*_dominant().drop(index="task3").T.to_numpy()).pvalue)


def test_friedman_needs_three_methods_and_two_blocks() -> None:
    two = friedman(_dominant()[["A", "B"]])
    assert math.isnan(two.p) and math.isnan(two.statistic)
    assert two.reason is not None and "3 methods" in two.reason
    assert two.mean_ranks.tolist() == [1.0, 2.0]

    one_block = friedman(_dominant().iloc[:1])
    assert math.isnan(one_block.p) and "2 complete blocks" in one_block.reason

    tied = friedman(pd.DataFrame({"A": [1.0, 2.0], "B": [1.0, 2.0], "C": [1.0, 2.0]}))
    assert math.isnan(tied.p) and "tie" in tied.reason


def test_nemenyi_dominant_table() -> None:
    scores = _dominant()
    p = nemenyi(scores)
    # orientation: methods (columns of scores) index the result, not tasks
    assert list(p.index) == list(p.columns) == ["A", "B", "C"]
    assert p.loc["A", "C"] < 0.05
    assert np.allclose(p.to_numpy(), p.to_numpy().T)
    assert np.all(np.diag(p.to_numpy()) == 1.0)
    # by hand (Demšar 2006): q = |R_A − R_C| / sqrt(k(k+1)/(6N)), p from the studentized range
    k, n = 3, 8
    q = 2.0 / math.sqrt(k * (k + 1) / (6 * n))
    assert p.loc["A", "C"] == pytest.approx(stats.studentized_range.sf(q * math.sqrt(2), k, np.inf), rel=1e-9)
    assert nemenyi(scores, higher_is_better=False).to_numpy() == pytest.approx(p.to_numpy())


def test_critical_difference_matches_demsar_table() -> None:
    # Demšar (2006), Table 5(a): q_0.05 = 2.343 for k = 3, so CD = 2.343 · sqrt(3·4 / (6·8)) for N = 8
    assert critical_difference(3, 8) == pytest.approx(2.343 * math.sqrt(12 / 48), abs=1e-3)


def test_cd_diagram_writes_png_and_pdf(tmp_path: Path) -> None:
    scores = _dominant()
    scores["D"] = scores["B"] - 0.1
    paths = cd_diagram(scores, tmp_path / "figs" / "cd_glue", title="GLUE")
    assert paths == [tmp_path / "figs" / "cd_glue.png", tmp_path / "figs" / "cd_glue.pdf"]
    png, pdf = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


def test_cd_diagram_rejects_two_methods(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3 methods"):
        cd_diagram(_dominant()[["A", "B"]], tmp_path / "cd")
    assert not list(tmp_path.iterdir())


def test_significance_mark_thresholds() -> None:
    def mark(p: float) -> str:
        return significance_mark(Comparison(0.0, 0.0, 0.0, p, 3, 3, "welch"))

    assert (mark(0.049), mark(0.05), mark(0.5), mark(math.nan)) == ("", "n.s.", "n.s.", "n/a")
    assert significance_mark(Comparison(0.0, 0.0, 0.0, 0.02, 3, 3, "welch"), alpha=0.01) == "n.s."


# ---------------------------------------------------------------------------
# Against a fixed floor (the chance score)


def test_above_floor_is_scipys_one_sided_one_sample_t() -> None:
    x = [0.815, 0.812, 0.817]
    p = above_floor(x, 0.812)
    assert p == pytest.approx(stats.ttest_1samp(x, 0.812, alternative="greater").pvalue) and p > 0.05
    assert above_floor([0.86, 0.87, 0.85], 0.812) < 0.01  # ten standard errors above the floor
    assert above_floor([0.2, 0.25, 0.3], 0.5, higher_is_better=False) < 0.05  # a loss below its floor
    assert above_floor([0.85, 0.86, 0.87], 0.812, higher_is_better=False) > 0.99


def test_above_floor_degenerate_inputs() -> None:
    assert math.isnan(above_floor([0.9], 0.5)) and math.isnan(above_floor([0.9, 0.8], math.nan))
    assert above_floor([0.9, 0.9, 0.9], 0.5) == 0.0 and above_floor([0.5, 0.5], 0.5) == 1.0
    assert above_floor([0.9, math.nan, 0.9], 0.5) == 0.0  # a failed seed is dropped, not a crash

"""Significance tests behind the leaderboard: seeds, eval examples, and tasks.

A leaderboard cell is a mean over seeds of a metric computed on a shared eval set, and methods are
compared across many tasks. Each of those three levels has its own unit of replication, and each test
here treats exactly one of them as the random unit:

``welch`` — seeds are the unit.
    Each seed is an independent training run (its own init, data order and dropout), so the per-seed
    scores of method A and of method B are two independent samples. Nothing pairs seed 0 of A with
    seed 0 of B, and two methods need not have the same spread over seeds (full fine-tuning and a
    rank-1 adapter rarely do), so the unequal-variance (Welch) t-test is the right one: it assumes
    each side is roughly normal, not that the variances are equal, and its Welch–Satterthwaite
    degrees of freedom shrink when one side is noisy. With 3–5 seeds the normality assumption cannot
    be checked and the test is only a guide; it answers "would a fresh set of runs reproduce this
    ordering?".

``paired_bootstrap`` — eval examples are the unit.
    Every method is scored on the *same* eval examples, so the per-example scores are paired: an
    example that is hard for A is usually hard for B. Resampling examples (with replacement, keeping
    the pairs together) measures how much the difference would move on another draw of an eval set
    from the same distribution, and pairing removes the between-example variance that an unpaired
    test would charge against the difference. No distributional assumption is made beyond examples
    being exchangeable draws; the seeds of a run are averaged per example first, so this test does
    *not* account for seed-to-seed variance (use ``welch`` for that).

``friedman`` / ``nemenyi`` / ``cd_diagram`` — tasks are the unit (Demšar 2006).
    Across a suite, scores on different tasks are on different scales (accuracy, Matthews
    correlation, Pearson r), so they are compared through ranks within each task (block). The Friedman
    test asks whether the methods' mean ranks differ more than chance; it assumes blocks are
    independent and uses one value per cell (the mean over seeds). The Nemenyi post-hoc test then
    compares every pair of mean ranks with the studentized-range distribution, controlling the
    family-wise error over all pairs, and the critical-difference diagram draws that result.

``above_floor`` — seeds are the unit, against a fixed number.
    The one-sided one-sample t-test of a cell's seeds against the task's chance score (the best input-independent
    prediction on the same eval split, a constant computed from its labels): "is this run better than predicting
    the majority class?". The floor has no variance of its own, so Welch's two-sample test does not apply.

``holm`` adjusts a family of p-values (e.g. every method against the reference method) for multiple
comparisons with the Holm–Bonferroni step-down procedure, which controls the family-wise error rate
under any dependence between the tests.

Critical values and p-values all come from scipy, statsmodels and scikit-posthocs; nothing here
carries a table of its own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats
from statsmodels.stats.multitest import multipletests

__all__ = [
    "Comparison",
    "above_floor",
    "FriedmanResult",
    "cd_diagram",
    "critical_difference",
    "friedman",
    "holm",
    "nemenyi",
    "paired_bootstrap",
    "significance_mark",
    "welch",
]

#: Resampled means held in memory at once by ``paired_bootstrap`` (indices per chunk = this).
_BOOT_CHUNK_CELLS = 1 << 22
CD_DPI = 200


@dataclass(frozen=True)
class Comparison:
    """One method-vs-method comparison: ``diff`` = statistic(a) − statistic(b).

    ``n_a`` / ``n_b`` count the units the test treats as random: seeds for ``welch`` (after NaNs are
    dropped), eval examples for ``paired_bootstrap`` (equal on both sides).
    """

    diff: float
    ci_low: float
    ci_high: float
    p: float
    n_a: int
    n_b: int
    test: str


@dataclass(frozen=True)
class FriedmanResult:
    """Friedman test over a blocks (tasks) × methods table.

    ``mean_ranks`` is sorted best first (rank 1 = best, ties share the average rank).
    ``dropped_blocks`` lists the index labels of the rows dropped for having a NaN.
    ``reason`` says why ``statistic`` and ``p`` are NaN, and is ``None`` when they are not.
    """

    mean_ranks: pd.Series
    statistic: float
    p: float
    n_blocks: int
    n_methods: int
    dropped_blocks: list = field(default_factory=list)
    reason: str | None = None


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


# ---------------------------------------------------------------------------
# Seeds: Welch's t-test


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) − mean(b), one value per seed on each side.

    NaNs (failed or missing runs) are dropped first. The t statistic, Welch–Satterthwaite degrees of
    freedom, two-sided p and the ``level`` confidence interval of the difference come from
    ``scipy.stats.ttest_ind(equal_var=False)`` and its ``confidence_interval``.

    Degenerate inputs are decided here rather than left to scipy:

    * fewer than 2 values on either side: p and CI are NaN. A single run has no sample variance, so
      there is no standard error and no reference distribution (scipy returns NaN too, with a
      warning).
    * both sides constant (every seed gave the identical score, e.g. deterministic runs) with equal
      means: p and CI are NaN. The standard error is 0 and the difference is 0, so t = 0/0: the data
      carry no evidence either way. (scipy gives p = NaN here but a CI of (0, 0).)
    * both sides constant with different means: p = 0.0 and CI = (diff, diff). There is no run-to-run
      noise at all, so the observed difference is the exact difference (t = ±inf; scipy agrees on
      exactly-representable values).

    "Constant" means every value is identical, tested exactly (``np.ptp == 0``) rather than through
    the computed variance: scipy's mean of [0.1, 0.1, 0.1] is not exactly 0.1, so its variance is
    ~1e-34 rather than 0, and ``ttest_ind([0.1] * 3, [0.1] * 5)`` reports p ≈ 0.29 instead of NaN.
    Only one side being constant is an ordinary case and goes to scipy (df = n − 1 of the other
    side), with scipy's "precision loss" warning about the constant side silenced.
    """
    _check_level(level)
    x = np.asarray(a, dtype=float).ravel()
    y = np.asarray(b, dtype=float).ravel()
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    n_a, n_b = int(x.size), int(y.size)
    nan = math.nan
    diff = float(x.mean() - y.mean()) if n_a and n_b else nan
    if n_a < 2 or n_b < 2:
        return Comparison(diff, nan, nan, nan, n_a, n_b, "welch")
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        diff = float(x[0] - y[0])
        if diff == 0:
            return Comparison(0.0, nan, nan, nan, n_a, n_b, "welch")
        return Comparison(diff, diff, diff, 0.0, n_a, n_b, "welch")
    with warnings.catch_warnings():
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            # scipy flags a constant side as "catastrophic cancellation"; its variance is (near) 0, which
            # is the right input here, and the other side carries the standard error.
            warnings.filterwarnings("ignore", "Precision loss occurred in moment calculation", RuntimeWarning)
        res = stats.ttest_ind(x, y, equal_var=False)
    ci = res.confidence_interval(confidence_level=level)
    return Comparison(diff, float(ci.low), float(ci.high), float(res.pvalue), n_a, n_b, "welch")


def above_floor(values: Sequence[float], floor: float, higher_is_better: bool = True) -> float:
    """One-sided p of "the mean over seeds is better than `floor`" (one-sample t, df = n − 1; NaNs dropped).

    NaN with fewer than 2 values or a NaN floor (no standard error, or nothing to compare with); with every value
    identical, 0.0 when that value is better than the floor and 1.0 otherwise (no noise: the comparison is exact).
    """
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size < 2 or math.isnan(floor):
        return math.nan
    if np.ptp(x) == 0:
        return 0.0 if (x[0] > floor if higher_is_better else x[0] < floor) else 1.0
    res = stats.ttest_1samp(x, floor, alternative="greater" if higher_is_better else "less")
    return float(res.pvalue)


# ---------------------------------------------------------------------------
# Eval examples: paired bootstrap


def _per_example(scores: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=float)
    if arr.ndim == 2:
        arr = arr.mean(axis=0)  # mean over seeds, per example
    elif arr.ndim != 1:
        raise ValueError(f"{name} must have shape (n_examples,) or (n_seeds, n_examples), got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} has no examples")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite per-example scores; drop those examples from both sides first")
    return arr


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> Comparison:
    """Paired bootstrap over eval examples of mean score(a) − mean score(b).

    ``correct_a`` and ``correct_b`` hold per-example scores (1/0 correctness, or any metric that is a
    mean of per-example contributions) on the *same* examples in the same order, with shape
    ``(n_examples,)`` or ``(n_seeds, n_examples)``; the seed counts of the two sides may differ.
    Seeds are averaged per example, giving paired differences d_i; the statistic is mean_i d_i.
    Example indices are resampled with replacement ``n_boot`` times (``numpy.random.default_rng(seed)``),
    keeping each example's pair together.

    The CI is the percentile interval of the resampled statistics. The p-value is the two-sided
    bootstrap p = 2·min(P(d* ≤ 0), P(d* ≥ 0)), capped at 1: identical inputs give p = 1, and p = 0
    means no resample reached 0 (read it as p < 1/n_boot, the resolution of the test).
    """
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    a = _per_example(correct_a, "correct_a")
    b = _per_example(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b cover different numbers of examples: {a.size} vs {b.size}")
    d = a - b
    n = int(d.size)
    diff = float(d.mean())

    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK_CELLS // n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = d[idx].mean(axis=1)

    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2.0 * min(float(np.mean(boot <= 0)), float(np.mean(boot >= 0))))
    return Comparison(diff, float(low), float(high), p, n, n, "paired_bootstrap")


# ---------------------------------------------------------------------------
# Multiple comparisons


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order.

    NaN p-values (comparisons that could not be tested) stay NaN and are left out of the family, so
    they do not inflate the correction. (statsmodels' ``multipletests`` keeps NaNs in place but still
    counts them in the family size m, which over-corrects; hence the filtering here.)
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return [float(v) for v in out]


# ---------------------------------------------------------------------------
# Tasks: Friedman, Nemenyi, critical-difference diagram


def _complete_blocks(scores: pd.DataFrame) -> tuple[pd.DataFrame, list]:
    if not isinstance(scores, pd.DataFrame):
        raise TypeError(f"scores must be a pandas DataFrame (blocks × methods), got {type(scores).__name__}")
    if not scores.columns.is_unique:
        raise ValueError(f"scores has duplicate method columns: {list(scores.columns)}")
    values = scores.astype(float)
    incomplete = values.isna().any(axis=1)
    return values.loc[~incomplete], list(values.index[incomplete])


def _ranks(values: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """Within-block ranks, 1 = best, ties averaged."""
    return values.rank(axis=1, method="average", ascending=not higher_is_better)


def friedman(scores: pd.DataFrame, higher_is_better: bool = True) -> FriedmanResult:
    """Friedman test that the methods (columns) rank alike across the blocks (rows, tasks).

    One value per cell (the mean over seeds). Rows with any NaN are dropped, since the test needs
    complete blocks, and listed in ``dropped_blocks``. Mean ranks are taken over the remaining blocks
    (rank 1 = best; ``higher_is_better`` says which end is best). The statistic and p come from
    ``scipy.stats.friedmanchisquare`` (chi-squared approximation with tie correction). It needs at
    least 3 methods and 2 blocks; otherwise, or when every block is a complete tie (the statistic is
    0/0), ``statistic`` and ``p`` are NaN and ``reason`` says why.
    """
    values, dropped = _complete_blocks(scores)
    n_blocks, n_methods = values.shape
    if n_blocks:
        mean_ranks = _ranks(values, higher_is_better).mean(axis=0).sort_values(kind="stable")
    else:
        mean_ranks = pd.Series(np.nan, index=values.columns, dtype=float)
    mean_ranks.name = "mean_rank"

    reason = None
    if n_methods < 3:
        reason = f"Friedman test needs at least 3 methods, got {n_methods}"
    elif n_blocks < 2:
        reason = f"Friedman test needs at least 2 complete blocks, got {n_blocks}"
    elif all(np.ptp(row) == 0 for row in values.to_numpy()):
        reason = "every block is a complete tie; the Friedman statistic is undefined"
    if reason is not None:
        return FriedmanResult(mean_ranks, math.nan, math.nan, n_blocks, n_methods, dropped, reason)

    res = stats.friedmanchisquare(*(values[c].to_numpy() for c in values.columns))
    return FriedmanResult(
        mean_ranks, float(res.statistic), float(res.pvalue), n_blocks, n_methods, dropped, None
    )


def nemenyi(scores: pd.DataFrame, higher_is_better: bool = True) -> pd.DataFrame:
    """Pairwise p-values of the Nemenyi post-hoc test after Friedman (methods × methods, symmetric).

    Rows with any NaN are dropped, as in ``friedman``. ``scikit_posthocs.posthoc_nemenyi_friedman``
    takes blocks as rows and groups (methods) as columns — the same orientation as ``scores`` — and
    returns a DataFrame indexed by the methods with 1.0 on the diagonal. It ranks ascending; the
    p-values depend only on |difference of mean ranks|, which is the same either way, but the scores
    are negated when higher is better so its ranks agree with ours.
    """
    values, _ = _complete_blocks(scores)
    n_blocks, n_methods = values.shape
    if n_methods < 2 or n_blocks < 2:
        raise ValueError(
            f"Nemenyi test needs at least 2 methods and 2 complete blocks, got {n_methods} and {n_blocks}"
        )
    oriented = -values if higher_is_better else values
    import scikit_posthocs as sp  # imports seaborn and pyplot: only when a post-hoc test is asked for

    p = sp.posthoc_nemenyi_friedman(oriented)
    return p.loc[list(values.columns), list(values.columns)]


def critical_difference(n_methods: int, n_blocks: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of mean ranks (Demšar 2006): q_alpha · sqrt(k(k+1) / (6N)).

    q_alpha is the studentized-range quantile (infinite df) divided by sqrt(2), from scipy.
    """
    q = stats.studentized_range.ppf(1.0 - alpha, n_methods, np.inf) / math.sqrt(2.0)
    return float(q * math.sqrt(n_methods * (n_methods + 1) / (6.0 * n_blocks)))


def cd_diagram(
    scores: pd.DataFrame,
    out_stem: Path,
    higher_is_better: bool = True,
    alpha: float = 0.05,
    title: str | None = None,
) -> list[Path]:
    """Critical-difference diagram (Demšar 2006) of the methods' mean ranks over the blocks.

    Methods joined by a bar are not significantly different under the Nemenyi test at ``alpha``;
    the CD segment shows the critical difference of mean ranks. Drawn with
    ``scikit_posthocs.critical_difference_diagram`` on an Agg-canvas figure (no pyplot, no GUI
    backend), written to ``<out_stem>.png`` (200 dpi) and ``<out_stem>.pdf``; returns those paths.
    Raises ``ValueError`` when, after dropping rows with a NaN, fewer than 3 methods or 2 blocks
    remain.
    """
    res = friedman(scores, higher_is_better)
    if res.n_methods < 3:
        raise ValueError(f"a critical-difference diagram needs at least 3 methods, got {res.n_methods}")
    if res.n_blocks < 2:
        raise ValueError(f"a critical-difference diagram needs at least 2 complete blocks, got {res.n_blocks}")
    pvals = nemenyi(scores, higher_is_better)
    cd = critical_difference(res.n_methods, res.n_blocks, alpha)

    fig = Figure(figsize=(6.0, 0.9 + 0.3 * res.n_methods))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    import scikit_posthocs as sp  # imports seaborn and pyplot: only when a diagram is drawn

    sp.critical_difference_diagram(
        res.mean_ranks,
        pvals,
        alpha=alpha,
        ax=ax,
        label_fmt_left="{label} ({rank:.2f})",
        label_fmt_right="({rank:.2f}) {label}",
    )
    # The CD segment is drawn here rather than by the library (``cd=``), which puts it at y = 0.5 on
    # top of the rank tick labels; one data unit is one label row.
    bottom, _ = ax.get_ylim()
    ax.set_ylim(bottom, 2.0)
    x0 = float(res.mean_ranks.iloc[0])
    ax.plot([x0, x0 + cd], [1.3, 1.3], color="k", linewidth=2)
    ax.text(x0 + cd / 2, 1.5, f"CD = {cd:.2f}", ha="center", va="bottom")
    if title:
        ax.set_title(title)
    fig.tight_layout()

    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_name(out_stem.name + ".png"), out_stem.with_name(out_stem.name + ".pdf")]
    fig.savefig(paths[0], dpi=CD_DPI)
    fig.savefig(paths[1], metadata={"CreationDate": None})  # no timestamp: a rebuilt figure is byte-identical
    fig.clear()
    return paths


# ---------------------------------------------------------------------------
# Display


def significance_mark(cmp: Comparison, alpha: float = 0.05) -> str:
    """Mark for a leaderboard cell: "" if significant (p < alpha), "n.s." if not, "n/a" if untested."""
    if math.isnan(cmp.p):
        return "n/a"
    return "" if cmp.p < alpha else "n.s."

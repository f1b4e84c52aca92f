"""Spectral diagnostics of the weight updates ΔW: singular values, effective rank, energy and alignment.

For every completed run with a ``delta.safetensors`` and every layer in it (ΔW of shape (m, n) = (out, in)):

- ``sigma``: the singular values σ_1 ≥ … ≥ σ_p of ΔW (p = min(m, n)), from an fp32 SVD of the stored fp32 ΔW
  (accurate to about ε_fp32·σ_1, so values below ~1e-6·σ_1 are numerical zeros).
- ``effective_rank``: the entropy effective rank of Roy & Vetterli (2007), "The effective rank: a measure of
  effective dimensionality", EUSIPCO: erank = exp(H(p)), H(p) = −Σ_i p_i log p_i, p_i = σ_i / Σ_j σ_j. It is r
  for a rank-r matrix with r equal singular values and varies continuously in between.
- ``numerical_rank``: the number of σ_i above σ_1 · max(m, n) · ε_fp32 (numpy's matrix_rank rule with the
  machine epsilon of the fp32 the ΔW was stored in); a LoRA update of rank r has numerical rank r.
- ``energy_top_k``: the share of ‖ΔW‖_F² in the top k directions, Σ_{i≤k} σ_i² / Σ_i σ_i².
- ``alignment``: how much ΔW's top-k left singular subspace lies in W0's top-k left singular subspace: the mean
  squared cosine of the principal angles between the two, ‖U_ΔW[:, :k]ᵀ U_W0[:, :k]‖_F² / k. 1 when the two
  subspaces coincide, 0 when they are orthogonal, k/m in expectation for a random subspace of R^m. When ΔW has
  numerical rank below k, k is lowered to that rank for this layer (``k_align``): the further singular vectors
  of ΔW span numerical noise.
- ``rel_norm``: ‖ΔW‖_F / ‖W0‖_F, the size of the update.

    frame = spectral_frame("results", k=8)                       # one row per run × layer
    figure_spectrum("results", "results/analysis")              # spectrum.png (300 dpi) + spectrum.pdf
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analysis import plots
from analysis.weights import (
    as_matrix,
    base_svd,
    load_base_weights,
    load_deltas,
    method_rank,
    records_with_deltas,
)

__all__ = [
    "SpectralResult",
    "effective_rank",
    "energy_top_k",
    "figure_spectral_layers",
    "figure_spectrum",
    "layer_statistics",
    "numerical_rank",
    "plot_spectral_layers",
    "plot_spectrum",
    "run_label",
    "spectral_analysis",
    "spectral_frame",
    "spectral_summary",
    "subspace_alignment",
]

#: Columns of ``spectral_frame`` (one row per run × layer).
COLUMNS = [
    "id", "method", "label", "r", "seed", "task", "model", "layer", "block", "m", "n", "k", "k_align",
    "numerical_rank", "effective_rank", "energy_top_k", "alignment", "sigma_max", "fro_norm", "rel_norm",
]
FP32_EPS = float(torch.finfo(torch.float32).eps)
#: Normalised singular values below this are drawn at the floor of the spectrum plot (numerical zeros).
SPECTRUM_FLOOR = 1e-6


# ---------------------------------------------------------------------------------------------- measures


def effective_rank(s: Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): exp(−Σ p_i log p_i) with p_i = σ_i / Σ_j σ_j.

    ``s`` holds singular values (any order, ≥ 0); 0·log 0 counts as 0. NaN for an all-zero matrix.
    """
    s = s.double().clamp_min(0)  # (p,)
    total = s.sum()
    if total <= 0:
        return math.nan
    p = s / total  # (p,)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def energy_top_k(s: Tensor, k: int) -> float:
    """Σ_{i≤k} σ_i² / Σ_i σ_i²: the share of ‖ΔW‖_F² in the top-k singular directions (NaN when ΔW = 0)."""
    e = torch.sort(s.double(), descending=True).values ** 2  # (p,)
    total = e.sum()
    return float(e[:k].sum() / total) if total > 0 else math.nan


def numerical_rank(s: Tensor, shape: Sequence[int], eps: float = FP32_EPS) -> int:
    """Count of singular values above σ_1 · max(m, n) · eps (numpy's matrix_rank rule, fp32 epsilon)."""
    if s.numel() == 0 or float(s.max()) <= 0:
        return 0
    return int((s > s.max() * max(shape) * eps).sum())


def subspace_alignment(u_delta: Tensor, u_base: Tensor, k: int) -> float:
    """Mean squared cosine of the principal angles between span(u_delta[:, :k]) and span(u_base[:, :k]).

    Both arguments hold orthonormal columns sorted by decreasing singular value, (m, ≥k). The cosines of the
    principal angles are the singular values of U_ΔWᵀ U_W0, so the mean of their squares is
    ‖U_ΔW[:, :k]ᵀ U_W0[:, :k]‖_F² / k: 1 for the same subspace, 0 for orthogonal ones, k/m for a random one.
    """
    if k < 1:
        return math.nan
    overlap = u_delta[:, :k].double().T @ u_base[:, :k].double()  # (k, k)
    return float((overlap**2).sum() / k)


def layer_statistics(delta: Tensor, u_base: Tensor, w0_norm: float, k: int = 8) -> tuple[dict[str, float], Tensor]:
    """Spectral statistics of one ΔW against W0's left singular vectors; returns (stats, σ of ΔW).

    Args:
        delta: ΔW, (m, n).
        u_base: W0's left singular vectors, (m, p0), by decreasing singular value.
        w0_norm: ‖W0‖_F, for ``rel_norm``.
        k: the top-k of ``energy_top_k`` and ``alignment``.
    """
    delta = as_matrix(delta).float()  # (m, n)
    u, s, _ = torch.linalg.svd(delta, full_matrices=False)  # (m, p), (p,), (p, n)
    s = s.double()  # fp32 SVD error ≈ ε_fp32·σ_1, far below the numerical-rank threshold max(m, n)·ε_fp32·σ_1
    rank = numerical_rank(s, delta.shape)
    k_align = min(k, rank, u_base.shape[1])
    fro = float(s.norm())
    stats = {
        "m": delta.shape[0],
        "n": delta.shape[1],
        "k": k,
        "k_align": k_align,
        "numerical_rank": rank,
        "effective_rank": effective_rank(s),
        "energy_top_k": energy_top_k(s, k),
        "alignment": subspace_alignment(u, u_base, k_align) if k_align > 0 else math.nan,
        "sigma_max": float(s[0]) if s.numel() else math.nan,
        "fro_norm": fro,
        "rel_norm": fro / w0_norm if w0_norm > 0 else math.nan,
    }
    return stats, s


# ---------------------------------------------------------------------------------------------- frames


def run_label(method: str, r: int | None) -> str:
    """How a run's method is named in tables and legends: ``LoRA r=8``, ``Full FT``."""
    name = plots.method_label(str(method))
    return f"{name} r={r}" if r is not None and str(method) != "full" else name


def layer_block(name: str) -> int | None:
    """The transformer block index in a layer name (``...layer.3.attention...`` → 3), or None."""
    match = re.search(r"\.(?:layer|layers|h|blocks?)\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def record_columns(record: Mapping[str, Any]) -> dict[str, Any]:
    """The columns every per-run frame carries: id, method, label, r, seed, task, model."""
    r = method_rank(record)
    return {
        "id": record["id"],
        "method": record.get("method"),
        "label": run_label(str(record.get("method")), r),
        "r": r,
        "seed": record.get("seed"),
        "task": record.get("task"),
        "model": record.get("model"),
    }


@dataclass
class SpectralResult:
    """``frame``: one row per run × layer (``COLUMNS``); ``spectra``: {(run id, layer): σ of ΔW (p,), float64}."""

    frame: pd.DataFrame
    spectra: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


def spectral_analysis(results_dir: Path | str, k: int = 8) -> SpectralResult:
    """Statistics and singular values of every ΔW of every completed run under ``results_dir``.

    Runs without a ΔW file are skipped with a warning (``MissingDeltaError`` when none has one);
    ``NoRecordsError`` when there is no completed record.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows: list[dict[str, Any]] = []
    spectra: dict[tuple[str, str], np.ndarray] = {}
    for record, run_dir in records_with_deltas(results_dir):
        deltas = load_deltas(run_dir)
        w0 = load_base_weights(record, deltas)
        head = record_columns(record)
        for name, delta in deltas.items():
            base = base_svd(record, name)
            stats, s = layer_statistics(delta, base.u, float(as_matrix(w0[name]).norm()), k)
            rows.append({**head, "layer": name, "block": layer_block(name), **stats})
            spectra[(str(record["id"]), name)] = s.numpy()
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["r"] = frame["r"].astype("Int64")
    frame["block"] = frame["block"].astype("Int64")
    return SpectralResult(frame=frame, spectra=spectra)


def spectral_frame(results_dir: Path | str, k: int = 8) -> pd.DataFrame:
    """One row per run × layer: shape, numerical and effective rank, top-k energy, alignment with W0, norms.

    See the module docstring for the definitions; columns are ``COLUMNS``.
    """
    return spectral_analysis(results_dir, k).frame


def spectral_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model × task × method label: runs, layers, and the median (over runs × layers) of each statistic."""
    keys = ["model", "task", "label"]
    grouped = frame.groupby(keys, sort=True)
    summary = grouped.agg(
        runs=("id", "nunique"),
        layers=("layer", "count"),
        numerical_rank=("numerical_rank", "median"),
        effective_rank=("effective_rank", "median"),
        energy_top_k=("energy_top_k", "median"),
        alignment=("alignment", "median"),
        rel_norm=("rel_norm", "median"),
    ).reset_index()
    summary.attrs["k"] = int(frame["k"].iloc[0]) if len(frame) else None
    return summary


# ---------------------------------------------------------------------------------------------- figures


def _panels(frame: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """Groups by (model, task), in sorted order."""
    return [((str(m), str(t)), g) for (m, t), g in frame.groupby(["model", "task"], sort=True)]


def _panel_title(model: str, task: str, several_models: bool) -> str:
    title = plots.task_label(task)
    return f"{title} · {model}" if several_models else title


def _label_order(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(label, method) pairs: full fine-tuning first, then by method name and rank."""
    pairs = frame[["label", "method", "r"]].drop_duplicates()
    pairs = pairs.assign(first=pairs["method"] != "full", rank=pairs["r"].fillna(0).astype(int))
    pairs = pairs.sort_values(["first", "method", "rank"])
    return list(zip(pairs["label"], pairs["method"]))


def _linestyles(frame: pd.DataFrame) -> dict[str, str]:
    """A dash pattern per label, so that several ranks of one method (same colour) stay apart."""
    styles = ("-", "--", ":", "-.")
    out: dict[str, str] = {}
    for _, group in frame.groupby("method"):
        for i, label in enumerate(sorted(group["label"].unique(), key=lambda s: (len(s), s))):
            out[label] = styles[i % len(styles)]
    return out


def plot_spectrum(result: SpectralResult, out_dir: Path | str, formats: Sequence[str] = ("png", "pdf"),
                  stem: str = "spectrum") -> list[Path]:
    """Normalised singular-value spectrum σ_i/σ_1 of ΔW per method: median over layers (and runs) with an
    interquartile band, log y; one panel per model × task. Writes ``<out_dir>/<stem>.<format>``."""
    frame = result.frame
    if frame.empty:
        raise ValueError("no ΔW to plot")
    panels = _panels(frame)
    several_models = frame["model"].nunique() > 1
    dashes = _linestyles(frame)
    with plots.style():
        fig, axes = plots.new_figure(len(panels), single_size=(3.4, 2.5))
        for ax, ((model, task), group) in zip(axes, panels):
            p_max = 1
            for label, method in _label_order(group):
                rows = group[group["label"] == label]
                curves = [result.spectra[(str(i), str(layer))] for i, layer in zip(rows["id"], rows["layer"])]
                curves = [c / c[0] for c in curves if c.size and c[0] > 0]
                if not curves:
                    continue
                length = max(c.size for c in curves)
                stack = np.full((len(curves), length), np.nan)  # (layers, p): shorter spectra padded with NaN
                for j, c in enumerate(curves):
                    stack[j, : c.size] = c
                stack = np.maximum(stack, SPECTRUM_FLOOR)
                idx = np.arange(1, length + 1)
                median = np.nanmedian(stack, axis=0)  # (p,)
                q25, q75 = np.nanpercentile(stack, [25, 75], axis=0)  # (p,), (p,)
                color = plots.method_color(method)
                ax.fill_between(idx, q25, q75, color=color, alpha=0.18, linewidth=0)
                n_runs = rows["id"].nunique()
                ax.plot(idx, median, color=color, linestyle=dashes[label],
                        label=f"{label} ({n_runs} run{'s' if n_runs > 1 else ''})")
                p_max = max(p_max, length)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1, p_max)
            ax.set_ylim(SPECTRUM_FLOOR * 0.5, 1.5)
            ax.axhline(SPECTRUM_FLOOR, color="0.6", linewidth=0.5, linestyle=":", zorder=0)
            ax.text(p_max, SPECTRUM_FLOOR * 1.3, f"numerical zero (< {SPECTRUM_FLOOR:g})", ha="right",
                    va="bottom", fontsize=6, color="0.4")
            ax.set_xlabel("singular value index i")
            ax.set_ylabel(r"$\sigma_i(\Delta W)\,/\,\sigma_1(\Delta W)$")
            ax.set_title(_panel_title(model, task, several_models))
            ax.legend(loc="lower left")
        fig.suptitle("Spectrum of ΔW: median over layers, band = interquartile range", fontsize=8)
        return plots.save(fig, out_dir, stem, formats)


def figure_spectrum(results_dir: Path | str, out_dir: Path | str,
                    formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """The normalised singular-value spectrum of ΔW per method (median over layers, interquartile band, log y)
    from the records under ``results_dir``; writes ``<out_dir>/spectrum.{png,pdf}`` (PNG at 300 dpi)."""
    return plot_spectrum(spectral_analysis(results_dir), out_dir, formats)


def plot_spectral_layers(frame: pd.DataFrame, out_dir: Path | str, formats: Sequence[str] = ("png", "pdf"),
                         stem: str = "spectral_layers") -> list[Path]:
    """Effective rank, top-k energy and alignment with W0 per transformer block and method (mean over the
    block's matrices and the runs); one row of three panels per model × task."""
    frame = frame[frame["block"].notna()]
    if frame.empty:
        raise ValueError("no layer with a block index to plot")
    panels = _panels(frame)
    several_models = frame["model"].nunique() > 1
    dashes = _linestyles(frame)
    k = int(frame["k"].iloc[0])
    metrics = [("effective_rank", "effective rank of ΔW", True),
               ("energy_top_k", f"energy in top-{k} of ΔW", False),
               ("alignment", f"alignment with W0 (top-{k})", False)]
    with plots.style():
        fig, axes = plots.new_figure(3 * len(panels), ncols=3)
        for row, ((model, task), group) in enumerate(panels):
            for col, (column, ylabel, log_y) in enumerate(metrics):
                ax = axes[3 * row + col]
                for label, method in _label_order(group):
                    per_block = group[group["label"] == label].groupby("block")[column].mean()
                    ax.plot(per_block.index.astype(int), per_block.to_numpy(), color=plots.method_color(method),
                            marker=plots.method_marker(method), markersize=3, linestyle=dashes[label], label=label)
                if log_y:
                    ax.set_yscale("log")
                ax.set_xlabel("transformer block")
                ax.set_ylabel(ylabel)
                ax.set_title(_panel_title(model, task, several_models))
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
        return plots.save(fig, out_dir, stem, formats)


def figure_spectral_layers(results_dir: Path | str, out_dir: Path | str,
                           formats: Sequence[str] = ("png", "pdf"), k: int = 8) -> list[Path]:
    """Per-block effective rank, top-k energy and alignment of ΔW per method; ``<out_dir>/spectral_layers.*``."""
    return plot_spectral_layers(spectral_frame(results_dir, k), out_dir, formats)


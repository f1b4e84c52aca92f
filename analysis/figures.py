"""Named figure specs: each one regenerates a paper-style figure from the run records of a results directory.

    from analysis.figures import FIGURES, render
    render("pareto_params", "results", "figures")      # -> [figures/pareto_params.png, .pdf]

Every figure writes ``<out_dir>/<name>.<format>`` (PNG at 300 dpi, PDF with embedded TrueType fonts) and
returns the paths. ``intruders_vs_rank``, ``intruders_vs_eps``, ``spectrum`` and ``spectral_layers`` are
drawn by ``analysis.intruders`` and ``analysis.spectral`` (imported only when rendered).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from analysis import plots
from analysis.leaderboard import human_count, is_higher_better, method_order, task_order
from analysis.plots import pareto_front
from analysis.records import curves_frame, memory_kind_label, records_frame, require_records

__all__ = ["FIGURES", "FigureDataError", "FigureSpec", "pareto_front", "render"]

#: Window (in logged points, centred) of the moving average applied to each training-loss curve.
LOSS_SMOOTHING = 5

FigureFunction = Callable[[Path, Path, Sequence[str]], list[Path]]


@dataclass(frozen=True)
class FigureSpec:
    """A named figure: what it shows and the function that draws it.

    ``function(results_dir, out_dir, formats)`` writes ``<out_dir>/<name>.<format>`` for each format and
    returns the paths. ``external`` marks figures drawn by another analysis module.
    """

    name: str
    description: str
    function: FigureFunction
    external: bool = False


class FigureDataError(ValueError):
    """The records hold nothing the requested figure can draw."""


def render(
    name: str, results_dir: Path | str, out_dir: Path | str, formats: Sequence[str] = ("png", "pdf")
) -> list[Path]:
    """Draw the named figure from the records under ``results_dir`` into ``out_dir``; return the written paths.

    Raises ``ValueError`` for an unknown name (listing the known ones) or format, ``NoRecordsError`` when
    there is no record, and ``FigureDataError`` when the records hold nothing to draw.
    """
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; known figures: {', '.join(FIGURES)}")
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in formats if f not in plots.FORMATS]
    if unknown or not formats:
        raise ValueError(f"unsupported figure format(s) {unknown or list(formats)}; choose from {', '.join(plots.FORMATS)}")
    return FIGURES[name].function(Path(results_dir), Path(out_dir), formats)


# ---------------------------------------------------------------------------
# Data


def _completed(results_dir: Path) -> tuple[pd.DataFrame, dict[str, bool]]:
    """Completed run cells of ``results_dir`` (reruns collapsed) and the metric directions."""
    records, _ = require_records(results_dir)
    df = records_frame(records)
    directions = dict(df.attrs.get("higher_is_better", {}))
    done = df[df["status"] == "completed"].copy()
    if done.empty:
        raise FigureDataError(f"no completed run in {Path(results_dir) / 'runs'}; nothing to plot")
    for column in ("method", "model", "task"):
        done[column] = done[column].fillna("unknown").astype(str)
    return done, directions


def _panels(frame: pd.DataFrame, extra: str | None = None) -> list[tuple[tuple[str, ...], pd.DataFrame]]:
    """Groups by model × task (× ``extra``), models alphabetically and tasks in leaderboard order."""
    keys = ["model", "task"] + ([extra] if extra else [])
    tasks = {t: i for i, t in enumerate(task_order(frame["task"]))}
    groups = list(frame.groupby(keys, sort=False))
    groups.sort(key=lambda item: (item[0][0], tasks[item[0][1]], *map(str, item[0][2:])))
    return [(tuple(map(str, key)), group) for key, group in groups]


def _title(key: tuple[str, ...], several_models: bool) -> str:
    title = plots.task_label(key[1])
    return f"{title} · {key[0]}" if several_models else title


def _mode(values: pd.Series) -> str:
    modes = values.dropna().mode()
    return str(modes.iloc[0]) if len(modes) else ""


def _pad_limits(ax: Axes, x: np.ndarray, y_low: np.ndarray, y_high: np.ndarray, log_x: bool) -> None:
    """Axis limits with room around the points (and for their labels)."""
    x = x[np.isfinite(x)]
    lo, hi = float(np.nanmin(y_low)), float(np.nanmax(y_high))
    span = hi - lo if hi > lo else max(abs(hi) * 0.02, 1e-3)
    ax.set_ylim(lo - 0.18 * span, hi + 0.18 * span)
    if log_x:
        a, b = np.log10(x.min()), np.log10(x.max())
        pad = 0.15 * max(b - a, 0.5) + 0.15
        ax.set_xlim(10 ** (a - pad), 10 ** (b + pad))
    else:
        a, b = float(x.min()), float(x.max())
        span = b - a if b > a else max(abs(b) * 0.1, 1e-3)
        ax.set_xlim(a - 0.15 * span, b + 0.15 * span)


def _scale(max_value: float, units: Sequence[tuple[str, float]]) -> tuple[str, float]:
    """The first ``(name, threshold)`` whose threshold ``max_value`` reaches (else the last)."""
    for name, size in units:
        if max_value >= size:
            return name, size
    return units[-1]


# ---------------------------------------------------------------------------
# Pareto plots


@dataclass(frozen=True)
class _Axis:
    column: str
    label: str
    divisor: float = 1.0
    log: bool = False
    split_by: str | None = None
    label_for: Callable[[tuple[str, ...]], str] | None = None


def _pareto_figure(results_dir: Path, out_dir: Path, formats: Sequence[str], stem: str, axis: _Axis) -> list[Path]:
    done, directions = _completed(results_dir)
    data = done.dropna(subset=["score", axis.column]).copy()
    if axis.log:
        data = data[data[axis.column] > 0]  # a log axis cannot show 0 (e.g. a training-free method)
    if data.empty:
        raise FigureDataError(f"{stem}: no completed run records both a score and a positive {axis.column}")
    if axis.split_by:
        data[axis.split_by] = data[axis.split_by].fillna("unknown").astype(str)
    panels = _panels(data, axis.split_by)
    several_models = data["model"].nunique() > 1
    any_seeds = False

    with plots.style():
        fig, axes = plots.new_figure(len(panels))
        labelled = []
        for ax, (key, group) in zip(axes, panels):
            metric = _mode(group["main_metric"])
            higher = is_higher_better(metric, directions)
            scaled = higher and bool(group["score"].abs().le(1).all())
            factor = 100.0 if scaled else 1.0
            agg = group.groupby("method").agg(
                mean=("score", "mean"), std=("score", "std"), n=("score", "count"), x=(axis.column, "median")
            )
            agg = agg.loc[method_order(agg.index)]
            x = agg["x"].to_numpy(float) / axis.divisor
            y = agg["mean"].to_numpy(float) * factor
            err = np.nan_to_num(agg["std"].to_numpy(float) * factor)
            any_seeds |= bool((agg["n"] > 1).any())
            if axis.log:
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_count(v)))
                ax.xaxis.set_minor_formatter(NullFormatter())
            for method, xi, yi, ei in zip(agg.index, x, y, err):
                color = plots.method_color(method)
                ax.errorbar(
                    xi, yi, yerr=ei if ei > 0 else None, fmt=plots.method_marker(method), color=color,
                    markerfacecolor=to_rgba(color, 0.45), markeredgecolor=color, markeredgewidth=0.9,
                    elinewidth=0.8, zorder=3,
                )
            _pad_limits(ax, x, y - err, y + err, axis.log)
            front = plots.draw_pareto_front(ax, x, y, higher)
            ax.set_title(_title(key, several_models))
            ax.set_xlabel(axis.label_for(key) if axis.label_for else axis.label)
            ax.set_ylabel(plots.metric_label(metric, scaled, higher))
            labelled.append((ax, x, y, err, list(agg.index), agg["n"].astype(int).tolist(), front))
        # A method with fewer seeds than the panel's most is labelled "(n=k)".
        marked = any(len(set(counts)) > 1 for *_, counts, _ in labelled)
        spread = "Mean ± s.d. over seeds" if any_seeds else "One seed per method (no error bars)"
        if marked:
            spread += "; (n=k): only k seeds"
        handles = [
            Line2D([], [], color="0.45", linestyle="--", linewidth=0.9, label="Pareto front"),
            Line2D([], [], color="0.3", marker="o", linestyle="none", label=spread),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2)
        fig.draw_without_rendering()  # final layout (labels are kept out of it): measure once, then place
        for ax, x, y, err, methods, counts, front in labelled:
            texts = [
                plots.method_label(m) + (f" (n={n})" if n != max(counts) else "") for m, n in zip(methods, counts)
            ]
            plots.label_points(
                ax, x, y, texts, [plots.method_color(m) for m in methods], yerr=err, avoid_lines=[front],
                layout=False,
            )
        return plots.save(fig, out_dir, stem, formats)


def figure_pareto_params(results_dir: Path, out_dir: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Main score vs trainable parameters (log x), one panel per model × task."""
    axis = _Axis("trainable", "Trainable parameters (log scale)", log=True)
    return _pareto_figure(results_dir, out_dir, formats, "pareto_params", axis)


def figure_pareto_memory(results_dir: Path, out_dir: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Main score vs peak memory (median over seeds), one panel per model × task × memory kind."""
    done, _ = _completed(results_dir)
    peak = done["peak_mem_bytes"].max(skipna=True)
    unit, size = _scale(0.0 if pd.isna(peak) else float(peak), [("GB", 1e9), ("MB", 1e6)])

    def label(key: tuple[str, ...]) -> str:
        kind = memory_kind_label(key[2]) if key[2] != "unknown" else "kind not recorded"
        return f"Peak memory ({unit}, {kind})"

    axis = _Axis("peak_mem_bytes", "Peak memory", divisor=size, split_by="peak_mem_kind", label_for=label)
    return _pareto_figure(results_dir, out_dir, formats, "pareto_memory", axis)


def figure_pareto_time(results_dir: Path, out_dir: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Main score vs training wall time (median over seeds), one panel per model × task."""
    done, _ = _completed(results_dir)
    longest = done["train_s"].max(skipna=True)
    unit, size = _scale(0.0 if pd.isna(longest) else float(longest), [("h", 7200.0), ("min", 120.0), ("s", 0.0)])
    size = {"h": 3600.0, "min": 60.0, "s": 1.0}[unit]
    axis = _Axis("train_s", f"Training time ({unit})", divisor=size)
    return _pareto_figure(results_dir, out_dir, formats, "pareto_time", axis)


# ---------------------------------------------------------------------------
# Training curves


def _smooth(values: pd.Series, window: int = LOSS_SMOOTHING) -> pd.Series:
    """Centred moving average over ``window`` logged points (shorter at the ends)."""
    return values.rolling(window, center=True, min_periods=1).mean()


def figure_loss_curves(results_dir: Path, out_dir: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Training loss vs step per method: mean over seeds with a min–max band, one panel per model × task."""
    records, _ = require_records(results_dir)
    curves = curves_frame(records)
    if "loss" not in curves.columns:
        raise FigureDataError(f"no run in {Path(results_dir) / 'runs'} logged a training loss")
    curves = curves[(curves["status"] == "completed") & np.isfinite(curves["loss"].astype(float))].copy()
    if curves.empty:
        raise FigureDataError(f"no completed run in {Path(results_dir) / 'runs'} logged a training loss")
    for column in ("method", "model", "task"):
        curves[column] = curves[column].fillna("unknown").astype(str)
    panels = _panels(curves)
    several_models = curves["model"].nunique() > 1
    methods = method_order(curves["method"])
    several_seeds = False

    with plots.style():
        fig, axes = plots.new_figure(len(panels))
        for ax, (key, group) in zip(axes, panels):
            for method in method_order(group["method"]):
                runs = group[group["method"] == method]
                smoothed = {
                    run: _smooth(run_rows.sort_values("step").set_index("step")["loss"])
                    for run, run_rows in runs.groupby(runs["id"].fillna("").astype(str) + "/" + runs["seed"].astype(str))
                }
                table = pd.DataFrame(smoothed).sort_index()
                color = plots.method_color(method)
                steps = table.index.to_numpy(float)
                ax.plot(steps, table.mean(axis=1).to_numpy(float), color=color, linewidth=1.1, zorder=3)
                if table.shape[1] > 1:
                    several_seeds = True
                    ax.fill_between(
                        steps, table.min(axis=1).to_numpy(float), table.max(axis=1).to_numpy(float),
                        color=color, alpha=0.18, linewidth=0, zorder=2,
                    )
            ax.set_title(_title(key, several_models))
            ax.set_xlabel("Step")
            ax.set_ylabel("Training loss")
            ax.set_xlim(left=0)
        handles = plots.method_handles(methods, line=True)
        if several_seeds:
            handles.append(Patch(color="0.5", alpha=0.3, linewidth=0, label="Min–max over seeds"))
        spread = "Mean over seeds" if several_seeds else "One seed per method"
        narrow = len(panels) == 1  # a one-column figure: wrap the title, fewer legend columns
        title = f"{spread};{chr(10) if narrow else ' '}smoothed: centred moving average of {LOSS_SMOOTHING} logged points"
        columns = 4 if narrow else 3 * min(len(panels), 3)
        legend = fig.legend(
            handles=handles, loc="outside lower center", ncols=min(len(handles), columns), title=title,
            title_fontsize=plots.STYLE["legend.fontsize"], handlelength=1.5, columnspacing=1.2,
        )
        legend.get_title().set_multialignment("center")
        return plots.save(fig, out_dir, "loss_curves", formats)


# ---------------------------------------------------------------------------
# Figures drawn by the spectral and intruder analyses (imported on use)


def _intruders_vs_rank(results_dir: Path, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    from analysis.intruders import figure_intruders_vs_rank

    return figure_intruders_vs_rank(results_dir, out_dir, formats)


def _intruders_vs_eps(results_dir: Path, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    from analysis.intruders import figure_intruders_vs_eps

    return figure_intruders_vs_eps(results_dir, out_dir, formats)


def _spectrum(results_dir: Path, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    from analysis.spectral import figure_spectrum

    return figure_spectrum(results_dir, out_dir, formats)


def _spectral_layers(results_dir: Path, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    from analysis.spectral import figure_spectral_layers

    return figure_spectral_layers(results_dir, out_dir, formats)


FIGURES: dict[str, FigureSpec] = {
    spec.name: spec
    for spec in (
        FigureSpec(
            "pareto_params",
            "Main score vs trainable parameters (log x), per task; mean ± s.d. over seeds, Pareto front as a "
            "dashed step line, methods labelled.",
            figure_pareto_params,
        ),
        FigureSpec(
            "pareto_memory",
            "Main score vs peak memory (median over seeds; the axis names the kind: RSS or CUDA max allocated), "
            "per task; Pareto front and labels as in pareto_params.",
            figure_pareto_memory,
        ),
        FigureSpec(
            "pareto_time",
            "Main score vs training wall time (median over seeds), per task; Pareto front and labels as in "
            "pareto_params.",
            figure_pareto_time,
        ),
        FigureSpec(
            "loss_curves",
            f"Training loss vs step per method, one panel per task: mean over seeds with a min–max band; each "
            f"curve is smoothed by a centred moving average of {LOSS_SMOOTHING} logged points.",
            figure_loss_curves,
        ),
        FigureSpec(
            "intruders_vs_rank",
            "Intruder dimensions vs adapter rank (drawn by analysis.intruders).",
            _intruders_vs_rank,
            external=True,
        ),
        FigureSpec(
            "intruders_vs_eps",
            "Intruder-dimension count vs the similarity threshold ε (drawn by analysis.intruders).",
            _intruders_vs_eps,
            external=True,
        ),
        FigureSpec(
            "spectrum",
            "Singular-value spectra of each ΔW (drawn by analysis.spectral).",
            _spectrum,
            external=True,
        ),
        FigureSpec(
            "spectral_layers",
            "Effective rank, top-k energy and alignment with W0 of ΔW per transformer block (drawn by "
            "analysis.spectral).",
            _spectral_layers,
            external=True,
        ),
    )
}

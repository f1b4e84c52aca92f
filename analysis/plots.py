"""Paper-ready matplotlib helpers: one style, one colour and marker per method, PNG + PDF saving.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so nothing
here touches global GUI state and the module works headless::

    with plots.style():
        fig, axes = plots.new_figure(3)
        ...
        paths = plots.save(fig, out_dir, "pareto_params")   # pareto_params.png (300 dpi) + .pdf
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "DPI",
    "FORMATS",
    "STYLE",
    "label_points",
    "method_color",
    "method_label",
    "method_marker",
    "method_handles",
    "metric_label",
    "new_figure",
    "pareto_front",
    "draw_pareto_front",
    "save",
    "style",
    "task_label",
]

#: Resolution of raster output.
DPI = 300
#: Formats ``save`` writes.
FORMATS = ("png", "pdf", "svg")

#: rcParams shared by every figure: 8 pt text (readable at paper size), no top/right spines, light grid,
#: TrueType fonts embedded in PDF (editable, accepted by conference templates), text kept as text in SVG.
STYLE: dict[str, object] = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.frameon": False,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "lines.linewidth": 1.2,
    "lines.markersize": 5,
    "errorbar.capsize": 2,
    "mathtext.default": "regular",
    "savefig.dpi": DPI,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
}

#: Fixed colours (Okabe–Ito, colour-blind safe) for the methods we know; full fine-tuning is black.
METHOD_COLORS = {
    "full": "#000000",
    "lora": "#0072B2",
    "dora": "#D55E00",
    "pissa": "#009E73",
    "olora": "#CC79A7",
    "lora_ga": "#E69F00",
    "lora_sb": "#56B4E9",
    "vera": "#882255",
    "adalora": "#999933",
}
#: Colours for any other method, picked by a hash of its name (stable across figures and runs); chosen
#: to stay apart from the fixed colours above. The marker is hashed separately, so two methods that share
#: a colour usually still differ in marker.
FALLBACK_COLORS = (
    "#332288", "#9467BD", "#8C564B", "#997700", "#EE6677",
    "#7F7F7F", "#AA4499", "#2F4F4F", "#117799", "#6B8E23",
)
METHOD_MARKERS = {"full": "D", "lora": "o", "dora": "s", "pissa": "^", "olora": "v", "lora_ga": "P"}
FALLBACK_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "p", "h")
#: How methods are written in figures (default: the config name).
METHOD_LABELS = {
    "full": "Full FT",
    "lora": "LoRA",
    "dora": "DoRA",
    "pissa": "PiSSA",
    "olora": "OLoRA",
    "lora_ga": "LoRA-GA",
    "lora_sb": "LoRA-SB",
    "lq_lora": "LQ-LoRA",
    "eora": "EoRA",
    "vera": "VeRA",
    "adalora": "AdaLoRA",
    "randlora": "RandLoRA",
    "miss": "MiSS",
    "bone": "Bone",
    "sora": "SoRA",
    "allora": "ALLoRA",
    "lora_pro": "LoRA-Pro",
    "galore": "GaLore",
    "frugal": "FRUGAL",
    "sara": "SaRA",
    "ba_lora": "BA-LoRA",
    "lora_ggpo": "LoRA-GGPO",
    "dylora": "DyLoRA",
    "increlora": "IncreLoRA",
    "triadaptlora": "TriAdaptLoRA",
    "lisa": "LISA",
    "owlore": "OwLore",
    "lamda": "LaMDA",
    "fedsvd": "FedSVD",
    "diffora": "DiffoRA",
    "welore": "WeLore",
    "svfit": "SVFit",
    "salt": "SALT",
    "loldu": "LoLDU",
    "nola": "NOLA",
    "hydra": "Hydra",
    "block_lora": "Block-LoRA",
    "wara": "WaRA",
    "smora": "SMoRA",
}
TASK_LABELS = {
    "glue/cola": "CoLA",
    "glue/sst2": "SST-2",
    "glue/mrpc": "MRPC",
    "glue/stsb": "STS-B",
    "glue/qqp": "QQP",
    "glue/mnli": "MNLI",
    "glue/qnli": "QNLI",
    "glue/rte": "RTE",
    "gsm8k": "GSM8K",
}
METRIC_LABELS = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "matthews_corr": "MCC",
    "pearson": "Pearson r",
    "spearmanr": "Spearman ρ",
    "loss": "Loss",
}


def _hashed(name: str, choices: Sequence[str]) -> str:
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return choices[int.from_bytes(digest[:4], "big") % len(choices)]


def method_color(method: str) -> str:
    """The method's colour: fixed for known methods (full fine-tuning black), hashed from the name otherwise."""
    return METHOD_COLORS.get(method) or _hashed(method, FALLBACK_COLORS)


def method_marker(method: str) -> str:
    """The method's marker, fixed or hashed like its colour."""
    return METHOD_MARKERS.get(method) or _hashed("marker:" + method, FALLBACK_MARKERS)


def method_label(method: str) -> str:
    """``LoRA`` for ``lora``; unknown methods by name."""
    return METHOD_LABELS.get(method, method)


def task_label(task: str) -> str:
    """``SST-2`` for ``glue/sst2``; unknown tasks by name."""
    return TASK_LABELS.get(task, task)


def metric_label(metric: str, scaled: bool = False, higher_is_better: bool = True) -> str:
    """``Accuracy (×100)``; ``Perplexity (lower is better)``."""
    text = METRIC_LABELS.get(metric, metric.replace("_", " ").capitalize())
    if scaled:
        text += " (×100)"
    if not higher_is_better:
        text += " (lower is better)"
    return text


@contextlib.contextmanager
def style() -> Iterator[None]:
    """Apply ``STYLE`` while figures are built and saved."""
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(
    n_panels: int,
    ncols: int | None = None,
    panel_size: tuple[float, float] = (2.35, 2.05),
    single_size: tuple[float, float] = (3.4, 2.6),
) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with ``n_panels`` axes in a grid (at most 3 columns by default).

    One panel gets ``single_size`` (a one-column paper figure); more get ``panel_size`` each. Call inside
    ``style()``.
    """
    if n_panels < 1:
        raise ValueError("a figure needs at least one panel")
    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    size = single_size if n_panels == 1 else (panel_size[0] * ncols, panel_size[1] * nrows)
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def method_handles(methods: Iterable[str], line: bool = False) -> list[Line2D]:
    """Legend handles, one per method, in its colour and marker (a line with ``line=True``)."""
    return [
        Line2D(
            [], [], color=method_color(m), marker=None if line else method_marker(m),
            linestyle="-" if line else "none", label=method_label(m),
        )
        for m in methods
    ]


def save(fig: Figure, out_dir: Path, stem: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``<out_dir>/<stem>.<format>`` for each format (PNG at 300 dpi), atomically; return the paths."""
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"unsupported figure format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with style():
        for fmt in formats:
            path = out_dir / f"{stem}.{fmt}"
            tmp = out_dir / f".{stem}.{fmt}.tmp"
            metadata = {"CreationDate": None} if fmt == "pdf" else ({"Date": None} if fmt == "svg" else None)
            fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.03, metadata=metadata)
            os.replace(tmp, path)
            paths.append(path)
    return paths


# ---------------------------------------------------------------------------
# Pareto fronts


def pareto_front(cost: Sequence[float], score: Sequence[float], higher_is_better: bool = True) -> np.ndarray:
    """Indices of the points no other point dominates, ordered by increasing cost.

    A point dominates another when its cost is no higher and its score no worse, one of them strictly.
    Identical points are all kept; points with a NaN are never on the front.
    """
    cost = np.asarray(cost, dtype=float)
    score = np.asarray(score, dtype=float)
    if cost.shape != score.shape:
        raise ValueError("cost and score must have the same length")
    good = score if higher_is_better else -score
    valid = np.isfinite(cost) & np.isfinite(good)
    front = []
    for i in np.flatnonzero(valid):
        others = valid & (cost <= cost[i]) & (good >= good[i]) & ((cost < cost[i]) | (good > good[i]))
        if not others.any():
            front.append(i)
    return np.array(sorted(front, key=lambda i: (cost[i], -good[i], i)), dtype=int)


def pareto_steps(
    cost: Sequence[float], score: Sequence[float], higher_is_better: bool = True, x_end: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the front's step line: each front point's score holds until the next front point's cost,
    and the last one holds until ``x_end`` (when given and beyond it)."""
    front = pareto_front(cost, score, higher_is_better)
    xs, ys = [], []
    for i, j in enumerate(front):
        x, y = float(np.asarray(cost, float)[j]), float(np.asarray(score, float)[j])
        if xs:
            xs.append(x)
            ys.append(ys[-1])
        xs.append(x)
        ys.append(y)
    if xs and x_end is not None and x_end > xs[-1]:
        xs.append(x_end)
        ys.append(ys[-1])
    return np.array(xs), np.array(ys)


def draw_pareto_front(
    ax: Axes, cost: Sequence[float], score: Sequence[float], higher_is_better: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the front as a dashed grey step line running on to the right edge of the axes (nothing to the
    right does better); call after the x limits are final. Returns the line's vertices."""
    xs, ys = pareto_steps(cost, score, higher_is_better, x_end=ax.get_xlim()[1])
    if len(xs) > 1:
        ax.plot(xs, ys, color="0.45", linestyle="--", linewidth=0.9, zorder=1, clip_on=True)
    return xs, ys


# ---------------------------------------------------------------------------
# Direct labels


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Overlap area of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def label_points(
    ax: Axes,
    x: Sequence[float],
    y: Sequence[float],
    texts: Sequence[str],
    colors: Sequence[str],
    yerr: Sequence[float] | None = None,
    avoid_lines: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
    gap_pt: float = 5.5,
    leader_pt: float = 6.0,
    layout: bool = True,
) -> None:
    """Label each data point with its text, placed where it covers the least: other labels, the markers,
    the error bars (``yerr``) and the segments of ``avoid_lines`` (``(xs, ys)`` polylines in data
    coordinates, e.g. a Pareto step line). A label is tried right and left of its point at a few heights;
    one moved off its point's height gets a thin leader line. Labels stay inside the axes.

    Call after the axes limits are final. Positions are measured after running the figure's layout;
    ``layout=False`` skips that when the caller already ran it (``fig.draw_without_rendering()``) and
    nothing has changed the layout since.
    """
    fig = ax.figure
    if layout:
        fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    box = ax.get_window_extent(renderer)
    frame = (box.x0, box.y0, box.x1, box.y1)
    fontsize = matplotlib.rcParams["legend.fontsize"]
    font = matplotlib.font_manager.FontProperties(size=fontsize)
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    points = ax.transData.transform(np.column_stack([xs, ys]))
    gap, leader, half = gap_pt * px_per_pt, leader_pt * px_per_pt, 3.5 * px_per_pt

    # Obstacles as (box in pixels, weight): markers, error bars, line segments. Lines are thickened so
    # that text crossing one costs about as much as text covering a marker.
    obstacles = [((px - half, py - half, px + half, py + half), 2.0) for px, py in points]
    errors = np.zeros(len(xs)) if yerr is None else np.nan_to_num(np.asarray(yerr, float))
    thick = 2.0 * px_per_pt
    for xi, yi, ei in zip(xs, ys, errors):
        if ei > 0:
            (bx, b0), (_, b1) = ax.transData.transform([(xi, yi - ei), (xi, yi + ei)])
            obstacles.append(((bx - thick, min(b0, b1), bx + thick, max(b0, b1)), 1.5))
    for line_x, line_y in avoid_lines:
        if len(line_x) < 2:
            continue
        pts = ax.transData.transform(np.column_stack([np.asarray(line_x, float), np.asarray(line_y, float)]))
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
            segment = (min(x0, x1) - thick, min(y0, y1) - thick, max(x0, x1) + thick, max(y0, y1) + thick)
            obstacles.append((segment, 2.0))

    placed: list[tuple[float, float, float, float]] = []
    order = sorted(range(len(xs)), key=lambda i: (points[i][0], -points[i][1]))
    choices: dict[int, tuple[float, float, bool, bool]] = {}
    for i in order:
        px, py = points[i]
        w, h, _ = renderer.get_text_width_height_descent(texts[i], font, ismath=False)
        h += 2 * px_per_pt
        best = None
        area = w * h
        # Candidates: beside the point, or moved up/down and/or further out (then with a leader line).
        for step in (0, 1, -1, 2, -2, 3, -3, 4, -4):
            for out in (0.0, 1.0, 2.5):
                moved = step != 0 or out > 0
                for right in (True, False):
                    offset = gap + (leader * max(out, 1.0) if moved else 0.0)
                    x0 = px + offset if right else px - offset - w
                    candidate = (x0, py + 0.7 * h * step - h / 2, x0 + w, py + 0.7 * h * step + h / 2)
                    cost = (
                        sum(_overlap(candidate, other) for other in placed) * 3.0
                        + sum(_overlap(candidate, other) * weight for other, weight in obstacles)
                        + (area - _overlap(candidate, frame)) * 20.0
                        + (abs(step) * 0.06 + out * 0.03 + (0.0 if right else 0.04)) * area
                    )
                    if best is None or cost < best[0] - 1e-9:
                        best = (cost, candidate, right, moved)
        _, candidate, right, moved = best
        placed.append(candidate)
        choices[i] = (candidate[0] if right else candidate[2], (candidate[1] + candidate[3]) / 2, right, moved)

    for i, (text_x, text_y, right, moved) in choices.items():
        px, py = points[i]
        color = colors[i]
        arrow = {
            "arrowstyle": "-", "color": color, "linewidth": 0.6, "relpos": (0.0 if right else 1.0, 0.5),
            "shrinkA": 1.0, "shrinkB": 3.5,
        }
        ann = ax.annotate(
            texts[i],
            xy=(xs[i], ys[i]),
            xytext=((text_x - px) / px_per_pt, (text_y - py) / px_per_pt),
            textcoords="offset points",
            ha="left" if right else "right",
            va="center",
            fontsize=fontsize,
            color=color,
            annotation_clip=False,
            arrowprops=arrow if moved else None,
            zorder=5,
        )
        ann.set_in_layout(False)

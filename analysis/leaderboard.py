"""Leaderboards (Markdown, CSV, HTML) from the run records of a results directory."""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.stats import Comparison, above_floor, cd_diagram, friedman, holm, welch
from analysis.records import (
    METRIC_PREFIX,
    STATUSES,
    NoRecordsError,
    is_reported,
    memory_kind_label,
    records_frame,
    require_records,
)

__all__ = [
    "GLUE_TASKS",
    "SUITE_TASKS",
    "Leaderboard",
    "NoRecordsError",
    "build_leaderboard",
    "is_higher_better",
    "load_leaderboard",
    "mean_ranks",
    "rank_methods",
    "t_interval",
    "write_leaderboard",
]

GLUE_TASKS = (
    "glue/cola",
    "glue/sst2",
    "glue/mrpc",
    "glue/stsb",
    "glue/qqp",
    "glue/mnli",
    "glue/qnli",
    "glue/rte",
)
#: Metric used for the GLUE average where it differs from the task's main metric.
GLUE_AVG_METRIC = {"glue/stsb": "pearson"}
#: Suites with a fixed membership. Any other suite's members are the tasks seen in records of that suite.
SUITE_TASKS: dict[str, tuple[str, ...]] = {"glue": GLUE_TASKS}
#: Per-suite overrides of the metric averaged (default: the task's main metric).
SUITE_AVG_METRIC: dict[str, dict[str, str]] = {"glue": GLUE_AVG_METRIC}
#: Display names of suites (default: the suite name).
SUITE_NAMES = {"glue": "GLUE"}
#: Confidence level of the interval reported beside mean ± std.
CI_LEVEL = 0.95
#: Metric names treated as lower-is-better when no record states a direction.
LOWER_IS_BETTER_HINTS = ("loss", "error", "perplexity", "mse", "mae", "rmse")

MISSING = "—"
REFERENCE_METHOD = "lora"  # step times are also shown as a ratio to this method's; scores are tested against it
BASELINE_METHOD = "full"  # scores are also tested against full fine-tuning
ALPHA = 0.05  # the level of every significance mark (Welch's t over seeds, Holm-adjusted within a task)
AT_CHANCE = "°"  # a score not significantly above its task's chance score (the best input-independent prediction)
CHANCE_ROW = "*chance*"  # the model table's last row: each task's chance score
KEYS = ["method", "model", "task"]
CSV_NAME, MD_NAME, HTML_NAME = "leaderboard.csv", "leaderboard.md", "leaderboard.html"


# ---------------------------------------------------------------------------
# Ordering and formatting helpers


def method_order(methods: Iterable[str]) -> list[str]:
    """``full`` first, then alphabetical."""
    return sorted(set(methods), key=lambda m: (m != "full", m))


def task_order(tasks: Iterable[str]) -> list[str]:
    """GLUE subtasks in the usual GLUE order, then the rest alphabetically."""
    glue_rank = {task: i for i, task in enumerate(GLUE_TASKS)}
    return sorted(set(tasks), key=lambda t: (glue_rank.get(t, len(GLUE_TASKS)), t))


def human_count(n: float) -> str:
    """339K, 22.7M, 1.1B; small counts as integers; NaN as ``—``."""
    if n is None or pd.isna(n):
        return MISSING
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        rounded = float(f"{n / scale:.3g}")
        if abs(rounded) >= 1:
            return f"{rounded:g}{unit}"
    return f"{int(n)}"


def human_bytes(n: float) -> str:
    """Decimal MB/GB."""
    if n is None or pd.isna(n):
        return MISSING
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e7:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e6:.1f} MB"


def human_duration(seconds: float) -> str:
    """Seconds, minutes or hours with one decimal."""
    if seconds is None or pd.isna(seconds):
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def human_step(seconds: float) -> str:
    """Step time in ms below one second, else seconds."""
    if seconds is None or pd.isna(seconds):
        return MISSING
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def memory_label(n_bytes: float, kind: object) -> str:
    """``1.2 GB RSS``, ``3.4 GB CUDA max allocated``; the kind is omitted when unknown."""
    if n_bytes is None or pd.isna(n_bytes):
        return MISSING
    kind_text = memory_kind_label(kind)
    return human_bytes(n_bytes) + (f" {kind_text}" if kind_text else "")


def suite_label(suite: str) -> str:
    """``GLUE`` for ``glue``; other suites by name."""
    return SUITE_NAMES.get(suite, suite)


def t_interval(values: Iterable[float], level: float = CI_LEVEL) -> tuple[float, float]:
    """Student-t confidence interval of the mean of ``values`` (NaNs dropped); ``(nan, nan)`` below two values.

    mean ± t_{(1+level)/2, n-1} · s / √n, with s the sample standard deviation.
    """
    x = np.asarray([v for v in values if not pd.isna(v)], dtype=float)
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    mean = float(x.mean())
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean - half, mean + half


def rank_methods(summary: pd.DataFrame, higher: Callable[[str], bool]) -> pd.Series:
    """Rank of each ``summary`` row among the methods of its model × task that have a ``score_mean``.

    1 is best by the row's ``main_metric`` (``higher(metric)`` says whether higher is better); tied means
    share the average of their ranks. Rows without a score get NaN. Returns a Series aligned to ``summary``.
    """
    ranks = pd.Series(math.nan, index=summary.index, dtype=float)
    scored = summary[summary["score_mean"].notna()]
    for _, group in scored.groupby(["model", "task"]):
        metric = _mode(group["main_metric"]) or ""
        # Round away float noise so that equal scores computed differently still tie.
        values = group["score_mean"].astype(float).round(12)
        ranks.loc[group.index] = values.rank(method="average", ascending=not higher(metric))
    return ranks


def mean_ranks(ranked: pd.DataFrame) -> pd.DataFrame:
    """Mean rank of each method per model over the tasks where every compared method has a result.

    ``ranked`` has columns model, method, task and rank (NaN without a result). The compared methods of a
    model are those with at least one result for it. Returns columns model, method, mean_rank (NaN for a
    method without results or when no task qualifies), n_tasks (the qualifying tasks) and tasks
    (comma-separated, in task order).
    """
    rows = []
    for model, mine in ranked.groupby("model", sort=True):
        has = mine[mine["rank"].notna()]
        compared = set(has["method"])
        per_task = has.groupby("task")["method"].agg(set)
        common = task_order(task for task, methods in per_task.items() if methods == compared)
        for method in method_order(mine["method"]):
            values = has[(has["method"] == method) & has["task"].isin(common)]["rank"]
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "mean_rank": float(values.mean()) if method in compared and common else math.nan,
                    "n_tasks": len(common),
                    "tasks": ",".join(common),
                }
            )
    return pd.DataFrame(rows, columns=["model", "method", "mean_rank", "n_tasks", "tasks"])


def first_line(text: object, limit: int = 200) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters."""
    text = text if isinstance(text, str) else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _short_task(task: str) -> str:
    """``cola`` for ``glue/cola``."""
    return task.split("/", 1)[1] if "/" in task else task


def _mode(values: pd.Series) -> object:
    modes = values.dropna().mode()
    return modes.iloc[0] if len(modes) else None


# ---------------------------------------------------------------------------
# The leaderboard


@dataclass
class Leaderboard:
    """Aggregated results and the display tables built from them.

    ``summary`` is the CSV table (raw metric values, one row per method × model × task, with the 95%
    t-interval of the main score and each method's rank within its model × task); ``model_tables`` and
    ``task_tables`` hold display strings keyed by model / task; ``suites`` holds the suite averages
    (``glue`` is its GLUE slice, kept for compatibility) and ``mean_ranks`` the rank aggregation.
    """

    summary: pd.DataFrame
    model_tables: dict[str, pd.DataFrame]
    task_tables: dict[str, pd.DataFrame]
    glue: pd.DataFrame
    problems: pd.DataFrame
    status_counts: dict[str, int]
    footnotes: list[str]
    records_read: int
    cells: int
    modal_seeds: int
    skipped_files: int = 0
    source: str | None = None
    task_headings: dict[str, str] = field(default_factory=dict)
    suites: pd.DataFrame = field(default_factory=pd.DataFrame)
    mean_ranks: pd.DataFrame = field(default_factory=pd.DataFrame)
    warnings: list[str] = field(default_factory=list)  # comparisons that mix protocols or budgets
    friedman: dict[str, object] = field(default_factory=dict)  # model -> FriedmanResult over its common tasks
    rank_tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # model -> tasks × methods it ranked
    trial_records: int = 0  # tuning trials read and left out of every table
    probe_records: int = 0  # sharpness probes of guided studies, read and left out too

    # -- text pieces shared by Markdown and HTML

    def status_line(self) -> str:
        """How many records were read and the status of the run cells."""
        where = f" from {self.source}" if self.source else ""
        skipped = ""
        if self.skipped_files:
            s = "s" if self.skipped_files != 1 else ""
            skipped = f" ({self.skipped_files} unreadable file{s} skipped)"
        counts = ", ".join(f"{n} {status}" for status, n in self.status_counts.items() if n)
        probes = (f" {self.probe_records} sharpness probes (λ_max at init, no training) narrowed guided searches "
                  "and are not shown;" if self.probe_records else "")
        trials = (f" {self.trial_records} tuning trials (scored on validation holdouts) chose the reported "
                  "hyper-parameters and are not shown;" if self.trial_records else "") + probes
        return f"Read {self.records_read} records{where}{skipped};{trials} {self.cells} reported run cells: {counts}."

    def problem_lines(self) -> list[str]:
        """One line per failed or diverged run cell."""
        lines = []
        for row in self.problems.itertuples(index=False):
            seed = "" if pd.isna(row.seed) else f" / seed {row.seed}"
            error = ": ".join(part for part in (row.error_type, row.error_message) if isinstance(part, str) and part)
            run_id = f" ({row.id})" if isinstance(row.id, str) and row.id else ""
            error = error or "no error recorded"
            lines.append(f"{row.status}: {row.method} / {row.model} / {row.task}{seed}{run_id} — {error}")
        return lines

    def legend(self) -> str:
        """How to read the score cells."""
        seeds = f"; (n=k) marks a seed count other than the usual {self.modal_seeds}" if self.modal_seeds else ""
        level = f"{CI_LEVEL:.0%}"
        return (
            "Cells: the task's main metric ×100 (metrics outside [-1, 1] or lower-is-better are shown raw), "
            f"mean ± sample std over seeds{seeds}. {MISSING} means no completed run. ↓ marks lower-is-better metrics. "
            f"The per-task tables add the {level} confidence interval of the mean (Student t with n−1 degrees "
            "of freedom; blank for a single seed). Suite averages (e.g. GLUE avg) are the mean over the suite's "
            "tasks of each task's mean, shown only when every task of the suite has a completed run. "
            f"Rows are sorted best first (by mean rank over the common tasks, or by the one task's score). "
            f"**Bold**: the task's best row; ≈: not significantly different from it (Welch's t-test over seeds, "
            f"two-sided, Holm-adjusted over the rows of the task, level {ALPHA}): a gap inside the seed noise. The "
            f"per-task tables give each row's difference from {REFERENCE_METHOD} and from {BASELINE_METHOD} with its "
            f"{level} Welch interval and Holm-adjusted p (n.s.: p ≥ {ALPHA}), and the tuning effort behind it: "
            "protocol, trials, budget (steps × batch), the chosen values and the validation score that chose them, "
            "and the largest Hessian eigenvalue of the loss in the trainable parameters at init (power iteration; "
            f"bench/sharpness.py). The {CHANCE_ROW} row is each task's chance score: the best input-independent "
            "prediction on its eval split (the majority class; the most frequent answer; 0 for a correlation); "
            f"{AT_CHANCE} marks a score with no evidence that it beats it (one-sided one-sample t over seeds, "
            f"Holm-adjusted over the rows of the task, p ≥ {ALPHA}; one seed: not above it)."
        )

    # -- renderers

    def to_markdown(self, details: bool = True) -> str:
        """The leaderboard as Markdown; ``details`` adds the per-task tables."""
        out = ["# Leaderboard", "", self.status_line(), ""]
        out += [f"> **WARNING**: {_md_escape(w)}" for w in self.warnings] + ([""] if self.warnings else [])
        problems = self.problem_lines()
        if problems:
            out += ["Failed or diverged:", ""] + [f"- {_md_escape(line)}" for line in problems] + [""]
        out += [self.legend(), ""]
        for model, table in self.model_tables.items():
            out += [f"## {model}", "", _md_table(table), ""]
        if self.footnotes:
            out += ["## Notes", ""] + [f"{i}. {_md_escape(note)}" for i, note in enumerate(self.footnotes, 1)] + [""]
        if details and self.task_tables:
            out += ["## Per-task details", ""]
            for task, table in self.task_tables.items():
                out += [f"### {self.task_headings.get(task, task)}", "", _md_table(table), ""]
        return "\n".join(out).rstrip() + "\n"

    def to_html(self) -> str:
        """A static, self-contained HTML page with the same tables."""
        esc = html.escape
        body = ["<h1>Leaderboard</h1>", f"<p>{esc(self.status_line())}</p>"]
        body += [f'<p class="warning"><strong>WARNING</strong>: {esc(w)}</p>' for w in self.warnings]
        problems = self.problem_lines()
        if problems:
            items = "".join(f"<li>{esc(line)}</li>" for line in problems)
            body.append(f"<p>Failed or diverged:</p><ul>{items}</ul>")
        body.append(f'<p class="legend">{esc(self.legend())}</p>')
        for model, table in self.model_tables.items():
            body += [f"<h2>{esc(model)}</h2>", _html_table(table)]
        if self.footnotes:
            items = "".join(f"<li>{esc(note)}</li>" for note in self.footnotes)
            body += ["<h2>Notes</h2>", f"<ol>{items}</ol>"]
        if self.task_tables:
            body.append("<h2>Per-task details</h2>")
            for task, table in self.task_tables.items():
                body += [f"<h3>{esc(self.task_headings.get(task, task))}</h3>", _html_table(table)]
        return _HTML_PAGE.format(body="\n".join(body))

    def write(self, out_dir: Path) -> list[Path]:
        """Write ``leaderboard.md``, ``leaderboard.csv`` and ``leaderboard.html`` into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        contents = {
            MD_NAME: self.to_markdown(),
            CSV_NAME: self.summary.to_csv(index=False),
            HTML_NAME: self.to_html(),
        }
        paths = []
        for name, text in contents.items():
            paths.append(out_dir / name)
            _write_atomic(out_dir / name, text)
        for model, result in self.friedman.items():
            if result.reason is None:  # >= 3 methods on >= 2 common tasks
                paths += cd_diagram(self.rank_tables[model], out_dir / f"leaderboard_cd_{model}",
                                    title=f"{model}: mean rank over {result.n_blocks} tasks (Nemenyi, α = {ALPHA})")
        return paths


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Leaderboard</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }}
th {{ background: #f2f2f2; }}
tbody tr:nth-child(even) {{ background: #fafafa; }}
.legend {{ color: #555; font-size: 0.9rem; }}
.warning {{ color: #a00; font-weight: 600; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_table(table: pd.DataFrame) -> str:
    escaped = table.rename(columns=_md_escape).map(_md_escape)
    return escaped.to_markdown(index=False, disable_numparse=True)


def _html_table(table: pd.DataFrame) -> str:
    return table.to_html(index=False, border=0, escape=True, na_rep=MISSING)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Building


class _Footnotes:
    """Numbered notes, deduplicated; ``mark`` returns the ``[n]`` marker."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def mark(self, note: str) -> str:
        if note not in self.notes:
            self.notes.append(note)
        return f"[{self.notes.index(note) + 1}]"


def is_higher_better(metric: str, directions: Mapping[str, bool]) -> bool:
    """The records' stated direction for ``metric``, else a guess from its name (``loss``, ``error``: lower)."""
    if metric in directions:
        return directions[metric]
    return not any(hint in metric.lower() for hint in LOWER_IS_BETTER_HINTS)


_higher_is_better = is_higher_better


def _summarize(df: pd.DataFrame, metric_columns: list[str]) -> pd.DataFrame:
    """One row per method × model × task: run counts, score and metric statistics, costs."""
    base = df.groupby(KEYS).agg(
        suite=("suite", _mode),
        main_metric=("main_metric", _mode),
        eval_split=("eval_split", _mode),
        protocol=("protocol", _mode),
        budget=("budget", _mode),
        trials=("trials", "median"),
        chosen=("chosen", _mode),
        chosen_at_edge=("chosen_at_edge", _mode),
        val_objective=("val_objective", "median"),
        sharpness=("sharpness", "median"),
        chance=("chance", "median"),
    )
    counts = (
        df.groupby(KEYS)["status"].value_counts().unstack(fill_value=0).reindex(columns=list(STATUSES), fill_value=0)
    )
    counts.columns = [f"n_{status}" for status in counts.columns]

    done = df[df["status"] == "completed"]
    grouped = done.groupby(KEYS)
    stats = grouped.agg(
        n_seeds=("score", "count"),
        score_mean=("score", "mean"),
        score_std=("score", "std"),
        trainable=("trainable", "median"),
        total=("total", "median"),
        train_s_median=("train_s", "median"),
        step_s_median=("step_s", "median"),
        optimizer_state_bytes_median=("optimizer_state_bytes", "median"),
    )
    metric_stats = pd.concat(
        {".mean": grouped[metric_columns].mean(), ".std": grouped[metric_columns].std()}, axis=1
    )
    metric_stats.columns = [column + suffix for suffix, column in metric_stats.columns]
    metric_stats = metric_stats[sorted(metric_stats.columns)]

    # Peak memory: median over the most common memory kind of each group.
    memory = (
        done.dropna(subset=["peak_mem_bytes"])
        .groupby(KEYS + ["peak_mem_kind"], dropna=False)["peak_mem_bytes"]
        .agg(["median", "size"])
        .reset_index()
        .sort_values("size", kind="stable")
        .drop_duplicates(KEYS, keep="last")
        .set_index(KEYS)
        .rename(columns={"median": "peak_mem_bytes_median"})[["peak_mem_bytes_median", "peak_mem_kind"]]
    )

    intervals = grouped["score"].apply(t_interval)
    ci = pd.DataFrame(
        intervals.tolist(), index=intervals.index, columns=["score_ci95_low", "score_ci95_high"], dtype=float
    )

    summary = base.join([counts, stats, ci, metric_stats, memory]).reset_index()
    summary["n_seeds"] = summary["n_seeds"].fillna(0).astype(int)
    for column in ("trainable", "total"):
        values = summary[column]
        if values.dropna().mod(1).eq(0).all():
            summary[column] = values.round().astype("Int64")
    summary["trainable_pct"] = 100 * summary["trainable"] / summary["total"]
    # step time as a ratio to LoRA's on the same model and task: timings on shared machines compare as ratios
    lora = summary[summary["method"] == REFERENCE_METHOD].set_index(["model", "task"])["step_s_median"]
    reference = pd.Series(list(zip(summary["model"], summary["task"]))).map(lora.to_dict())
    summary["step_s_vs_lora"] = summary["step_s_median"].to_numpy() / reference.to_numpy(dtype=float)
    summary = summary[
        KEYS
        + ["suite", "main_metric", "eval_split", "n_seeds"]
        + list(counts.columns)
        + ["score_mean", "score_std", "score_ci95_low", "score_ci95_high", "chance"]
        + list(metric_stats.columns)
        + ["trainable", "total", "trainable_pct", "train_s_median", "step_s_median", "step_s_vs_lora"]
        + ["peak_mem_bytes_median", "peak_mem_kind", "optimizer_state_bytes_median"]
        + ["protocol", "budget", "trials", "chosen", "chosen_at_edge", "val_objective", "sharpness"]
    ]
    return _sort_rows(summary, ["model", "method", "task"])


def _sort_rows(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    ranks = {
        "method": {m: i for i, m in enumerate(method_order(frame["method"]))},
        "task": {t: i for i, t in enumerate(task_order(frame["task"]))},
    }
    return frame.sort_values(by, key=lambda col: col.map(ranks[col.name]) if col.name in ranks else col).reset_index(
        drop=True
    )


class _Builder:
    """Turns the run frame into the display tables of a ``Leaderboard``."""

    def __init__(self, df: pd.DataFrame, directions: Mapping[str, bool]) -> None:
        self.df = df
        self.done = df[df["status"] == "completed"]
        self.metrics = [
            c[len(METRIC_PREFIX) :]
            for c in df.columns
            if c.startswith(METRIC_PREFIX) and self.done[c].notna().any()
        ]
        self.directions = directions
        self.summary = _summarize(df, [METRIC_PREFIX + m for m in self.metrics])
        seeds = self.summary.loc[self.summary["n_seeds"] > 0, "n_seeds"]
        self.modal_seeds = int(seeds.mode().max()) if len(seeds) else 0
        self.notes = _Footnotes()
        self.task_marks = self._eval_split_notes()
        self.suite_members = self._suite_members()
        rank = rank_methods(self.summary, self.higher)
        self.summary.insert(self.summary.columns.get_loc("score_ci95_high") + 1, "rank", rank)
        self.ranks = mean_ranks(self.summary)
        # per-seed scores grouped once: every comparison of add_significance reads them
        self.scores_by_cell = {key: [float(v) for v in scores.dropna()]
                               for key, scores in self.done.groupby(["method", "model", "task"])["score"]}
        self.add_significance()
        self.summary["higher_is_better"] = [self.higher(m if isinstance(m, str) else "")  # NaN: a running cell
                                            for m in self.summary["main_metric"]]
        self.warnings = self.mixing_warnings()
        self.rank_tables = {model: self.rank_scores(model) for model in sorted(self.summary["model"].unique())}
        self.friedman = {model: friedman(table) for model, table in self.rank_tables.items() if table.shape[1] > 1}

    # -- statistics

    def seed_scores(self, method: str, model: str, task: str) -> list[float]:
        return self.scores_by_cell.get((method, model, task), [])

    def add_significance(self) -> None:
        """Welch's t over seeds of every row against the reference method (lora), full fine-tuning and the task's
        best row, Holm-adjusted over the rows of each model × task (one family per comparison)."""
        columns = {f"{name}_{part}": math.nan for name in ("vs_lora", "vs_full", "vs_best")
                   for part in ("diff", "ci_low", "ci_high", "p")}
        for column, value in columns.items():
            self.summary[column] = value
        self.summary["is_best"] = False
        self.summary["vs_chance_p"] = math.nan
        self.summary["at_chance"] = False
        for (model, task), group in self.summary[self.summary["score_mean"].notna()].groupby(["model", "task"]):
            higher = self.higher(_mode(group["main_metric"]) or "")
            self.add_chance_test(group, higher)
            best = group.loc[group["score_mean"].idxmax() if higher else group["score_mean"].idxmin(), "method"]
            top = group["score_mean"].max() if higher else group["score_mean"].min()
            self.summary.loc[group.index, "is_best"] = group["score_mean"].round(12) == round(float(top), 12)
            for name, other in (("vs_lora", REFERENCE_METHOD), ("vs_full", BASELINE_METHOD), ("vs_best", best)):
                if other not in set(group["method"]):
                    continue
                theirs = self.seed_scores(other, model, task)
                results: dict[int, Comparison] = {}
                for index, row in group.iterrows():
                    if row["method"] != other:
                        results[index] = welch(self.seed_scores(row["method"], model, task), theirs)
                adjusted = holm([c.p for c in results.values()])
                for (index, c), p in zip(results.items(), adjusted):
                    self.summary.loc[index, [f"{name}_diff", f"{name}_ci_low", f"{name}_ci_high", f"{name}_p"]] = (
                        c.diff, c.ci_low, c.ci_high, p)

    def add_chance_test(self, group: pd.DataFrame, higher: bool) -> None:
        """Each row of one model × task against its chance score (stats.above_floor, Holm-adjusted over the rows):
        `at_chance` marks a score without evidence that it beats the best input-independent prediction (p ≥ ALPHA,
        or a single seed that does not beat it)."""
        tested = group[group["chance"].notna()]
        pvalues = {index: above_floor(self.seed_scores(row["method"], row["model"], row["task"]), row["chance"],
                                      higher) for index, row in tested.iterrows()}
        finite = {index: p for index, p in pvalues.items() if not pd.isna(p)}
        for index, p in zip(finite, holm(list(finite.values()))):
            self.summary.loc[index, "vs_chance_p"] = p
            self.summary.loc[index, "at_chance"] = p >= ALPHA
        for index in set(pvalues) - set(finite):  # one seed: no test, only whether it beats the floor at all
            mean, floor = tested.at[index, "score_mean"], tested.at[index, "chance"]
            self.summary.loc[index, "at_chance"] = bool(mean <= floor if higher else mean >= floor)

    def within_noise_of_best(self, row: pd.Series) -> bool:
        """Not significantly different from the task's best row (the best row itself excluded)."""
        return not row["is_best"] and not pd.isna(row["vs_best_p"]) and row["vs_best_p"] >= ALPHA

    def mixing_warnings(self) -> list[str]:
        """One line per model × task whose rows were not obtained under one protocol and one budget: such a table
        compares tuning effort as much as methods."""
        lines = []
        for (model, task), group in self.summary.groupby(["model", "task"]):
            protocols = sorted({str(p) for p in group["protocol"].dropna()})
            budgets = sorted({str(b) for b in group["budget"].dropna()})
            if len(protocols) > 1:
                tuned = ", ".join(f"{p}: {', '.join(sorted(group.loc[group['protocol'] == p, 'method']))}"
                                  for p in protocols)
                lines.append(f"{model} / {task} MIXES TUNING PROTOCOLS ({tuned}); untuned rows ran at their "
                             "YAML defaults and are not comparable with tuned ones.")
            if len(budgets) > 1:
                lines.append(f"{model} / {task} MIXES BUDGETS (steps × batch: {', '.join(budgets)}).")
        return lines

    # -- per-metric conventions

    def higher(self, metric: str) -> bool:
        return _higher_is_better(metric, self.directions)

    def scaled(self, metric: str) -> bool:
        """Shown ×100: a higher-is-better metric whose values all lie in [-1, 1]."""
        values = self.done.get(METRIC_PREFIX + metric, pd.Series(dtype=float)).dropna()
        return self.higher(metric) and bool(values.abs().le(1).all())

    def metric_header(self, metric: str) -> str:
        return metric + ("" if self.higher(metric) else " ↓")

    def ci_cell(self, low: float, high: float, metric: str) -> str:
        """``[low, high]`` on the same scale as ``cell``; blank when there is no interval (one seed)."""
        if pd.isna(low) or pd.isna(high):
            return ""
        if self.scaled(metric):
            return f"[{low * 100:.1f}, {high * 100:.1f}]"
        return f"[{low:.4g}, {high:.4g}]"

    def value_text(self, value: float, metric: str) -> str:
        return f"{value * 100:.1f}" if self.scaled(metric) else f"{value:.4g}"

    def diff_cell(self, diff: float, low: float, high: float, p: float, metric: str) -> str:
        """``+1.2 [0.3, 2.1] p=0.01`` (×100 when the metric is), ``n.s.`` when p (Holm) ≥ ALPHA; blank for the
        reference row itself or a single seed."""
        if pd.isna(diff):
            return ""
        factor = 100.0 if self.scaled(metric) else 1.0
        text = f"{diff * factor:+.1f}" if factor == 100.0 else f"{diff:+.3g}"
        if not pd.isna(low):
            text += f" [{low * factor:.1f}, {high * factor:.1f}]" if factor == 100.0 else f" [{low:.3g}, {high:.3g}]"
        if pd.isna(p):
            return text
        return text + (f" p={p:.2g}" if p < ALPHA else f" n.s. (p={p:.2g})")

    def cell(self, mean: float, std: float, n: int, metric: str, expected_n: int | None = None) -> str:
        """``mean ± std`` (×100 when scaled), with ``(n=k)`` when ``n`` differs from ``expected_n``."""
        if n == 0 or pd.isna(mean):
            return MISSING
        factor, fmt = (100.0, "{:.1f}") if self.scaled(metric) else (1.0, "{:.4g}")
        text = fmt.format(mean * factor)
        if n > 1 and not pd.isna(std):
            text += " ± " + ("{:.1f}" if factor == 100.0 else "{:.2g}").format(std * factor)
        expected = self.modal_seeds if expected_n is None else expected_n
        if n != expected:
            text += f" (n={n})"
        return text

    # -- footnotes

    def _eval_split_notes(self) -> dict[str, str]:
        """Footnote markers for tasks evaluated on something other than an official dev set (an official test split,
        rows held out from train, or a task-specific evaluation such as generated images)."""
        marks: dict[str, str] = {}
        off_dev = self.df[self.df["eval_split"].notna() & (self.df["eval_split"] != "dev")]
        for task in task_order(off_dev["task"]):
            rows = off_dev[off_dev["task"] == task]
            splits = ", ".join(f"`{s}`" for s in sorted(rows["eval_split"].unique()))
            notes = " ".join(sorted({n.strip() for n in rows["eval_note"] if isinstance(n, str) and n.strip()}))
            if "heldout" in splits:
                text = f"{task}: scored on {splits} (rows held out from the training data), NOT the official dev set."
            elif set(rows["eval_split"].unique()) == {"test"}:
                text = f"{task}: scored on the official test split."
            else:
                text = f"{task}: scored on {splits}, not an official dev or test split."
            marks[task] = self.notes.mark(f"{text} {notes}".strip())
        return marks

    # -- tables

    def model_table(self, model: str) -> pd.DataFrame:
        """Methods × tasks for one model, plus suite averages, mean rank, trainable params and cost."""
        summary = self.summary[self.summary["model"] == model]
        tasks = task_order(summary["task"])
        suites = [suite for suite, members in self.suite_members.items() if set(members) & set(tasks)]
        ranks = self.ranks[self.ranks["model"] == model].set_index("method")
        ranked = summary.loc[summary["score_mean"].notna(), "method"].nunique() > 1  # else nothing to compare
        rank_header = self.rank_header(model, ranks) if ranked else None
        rows = []
        for method in self.ranked_methods(summary, ranks):
            mine = summary[summary["method"] == method].set_index("task")
            row = {"method": method}
            for task in tasks:
                header = self.task_header(task)
                if task not in mine.index:
                    row[header] = MISSING
                    continue
                r = mine.loc[task]
                row[header] = self.cell(r["score_mean"], r["score_std"], r["n_seeds"], r["main_metric"] or "")
                if r["is_best"]:
                    row[header] = f"**{row[header]}**"
                elif self.within_noise_of_best(r):
                    row[header] += " ≈"
                if r["at_chance"]:
                    row[header] += f" {AT_CHANCE}"
            for suite in suites:
                row[f"{suite_label(suite)} avg"] = self.suite_cell(suite, method, model)
            if rank_header is not None:
                value = ranks.at[method, "mean_rank"] if method in ranks.index else math.nan
                row[rank_header] = MISSING if pd.isna(value) else f"{value:.2f}"
            row["tuning"] = self.tuning_cell(mine)
            row.update(self.params_and_cost(method, model))
            rows.append(row)
        floors = summary.groupby("task")["chance"].median()
        if rows and floors.notna().any():  # the floor every score is read against, in the same units
            chance = {column: "" for column in rows[0]}
            chance["method"] = CHANCE_ROW
            for task in tasks:
                floor, metric = floors.get(task, math.nan), _mode(summary.loc[summary["task"] == task, "main_metric"])
                chance[self.task_header(task)] = MISSING if pd.isna(floor) else self.value_text(floor, metric or "")
            rows.append(chance)
        return pd.DataFrame(rows)

    def ranked_methods(self, summary: pd.DataFrame, ranks: pd.DataFrame) -> list[str]:
        """Methods best first: by mean rank over the tasks every method has (one task: by its score), then those
        without a rank by name."""
        by_rank = {}
        for method in summary["method"].unique():
            if method in ranks.index and not pd.isna(ranks.at[method, "mean_rank"]):
                by_rank[method] = float(ranks.at[method, "mean_rank"])
            else:
                mine = summary.loc[summary["method"] == method, "rank"].dropna()
                by_rank[method] = math.inf if mine.empty else 1e6 + float(mine.mean())
        return sorted(by_rank, key=lambda m: (by_rank[m], method_order(summary["method"]).index(m)))

    @staticmethod
    def tuning_cell(mine: pd.DataFrame) -> str:
        """``cheap · 4 trials · 100×32`` for tuned rows, ``untuned · 400×32`` otherwise."""
        protocols = sorted({str(p) for p in mine["protocol"].dropna()}) or ["none"]
        budgets = sorted({str(b) for b in mine["budget"].dropna()})
        parts = []
        for protocol in protocols:
            if protocol == "none":
                parts.append("untuned")
                continue
            trials = mine.loc[mine["protocol"] == protocol, "trials"].dropna()
            parts.append(f"{protocol} · {int(trials.max())} trials" if len(trials) else protocol)
        return " + ".join(parts) + (f" · {', '.join(budgets)}" if budgets else "")

    def task_header(self, task: str) -> str:
        metric = _mode(self.df.loc[self.df["task"] == task, "main_metric"])
        label = task
        if metric:
            raw = "" if self.scaled(metric) else ", raw"
            label = f"{task} ({self.metric_header(metric)}{raw})"
        return f"{label} {self.task_marks[task]}" if task in self.task_marks else label

    def rank_scores(self, model: str) -> pd.DataFrame:
        """Tasks × methods of one model: the mean score (negated for lower-is-better metrics, so higher is better
        everywhere), over the tasks where every method of the model has one."""
        summary = self.summary[(self.summary["model"] == model) & self.summary["score_mean"].notna()]
        table = summary.pivot_table(index="task", columns="method", values="score_mean", aggfunc="first")
        for task in table.index:
            metric = _mode(summary.loc[summary["task"] == task, "main_metric"]) or ""
            if not self.higher(metric):
                table.loc[task] = -table.loc[task]
        return table.dropna(axis=0, how="any")

    def rank_header(self, model: str, ranks: pd.DataFrame) -> str:
        """``mean rank [n]``, with a footnote saying which tasks were ranked and how."""
        compared = int(ranks["mean_rank"].notna().sum()) if len(ranks) else 0
        n_tasks = int(ranks["n_tasks"].iloc[0]) if len(ranks) else 0
        how = (
            "per task, methods are ranked by the task's main metric (1 = best, lower-is-better metrics "
            "ranked ascending; tied means share the average of their ranks)"
        )
        if n_tasks == 0:
            note = f"{model}: mean rank — no task has a completed result for every method with any result; {how}."
        else:
            names = ", ".join(ranks["tasks"].iloc[0].split(","))
            s = "s" if n_tasks != 1 else ""
            note = (
                f"{model}: mean rank over the {n_tasks} task{s} where all {compared} methods with results have one "
                f"({names}); {how}. Lower is better."
            )
            result = self.friedman[model]
            if result.reason is None:
                note += (f" Friedman test over the {result.n_blocks} tasks: χ² = {result.statistic:.3g}, "
                         f"p = {result.p:.2g} ({'the mean ranks differ' if result.p < ALPHA else 'no evidence that the mean ranks differ'} "
                         f"at level {ALPHA}); the critical-difference diagram (Nemenyi) is leaderboard_cd_{model}.png.")
            else:
                note += f" No Friedman test: {result.reason}."
        return f"mean rank {self.notes.mark(note)}"

    def _suite_members(self) -> dict[str, list[str]]:
        """Each suite's tasks: the fixed list of a known suite, else the tasks seen in records of the suite."""
        seen = self.df.dropna(subset=["suite"])
        names = {str(suite) for suite in seen["suite"].unique()} | set(SUITE_TASKS)
        members = {}
        for suite in sorted(names, key=lambda name: (name not in SUITE_TASKS, name)):
            if suite in SUITE_TASKS:
                members[suite] = list(SUITE_TASKS[suite])
            else:
                members[suite] = task_order(seen.loc[seen["suite"].astype(str) == suite, "task"])
        return {suite: tasks for suite, tasks in members.items() if tasks}

    def suite_average(self, suite: str, method: str, model: str) -> tuple[float, list[str]]:
        """Mean of the per-task metric means over the suite's tasks, and the tasks lacking a completed run."""
        mine = self.summary[(self.summary["method"] == method) & (self.summary["model"] == model)].set_index("task")
        overrides = SUITE_AVG_METRIC.get(suite, {})
        values, missing = [], []
        for task in self.suite_members.get(suite, []):
            if task not in mine.index:
                missing.append(task)
                continue
            metric = overrides.get(task) or mine.at[task, "main_metric"]
            column = f"{METRIC_PREFIX}{metric}.mean"
            value = mine.at[task, column] if column in mine.columns else math.nan
            if pd.isna(value):
                missing.append(task)
            else:
                values.append(float(value))
        return (float(np.mean(values)) if values and not missing else math.nan), missing

    def suite_scaled(self, suite: str) -> bool:
        """Whether the suite average is shown ×100: every averaged metric is."""
        overrides = SUITE_AVG_METRIC.get(suite, {})
        metrics = set()
        for task in self.suite_members.get(suite, []):
            main = _mode(self.df.loc[self.df["task"] == task, "main_metric"])
            metric = overrides.get(task) or main
            if metric:
                metrics.add(metric)
        return all(self.scaled(metric) for metric in metrics)

    def suite_cell(self, suite: str, method: str, model: str) -> str:
        average, missing = self.suite_average(suite, method, model)
        label = suite_label(suite)
        if not missing:
            return f"{average * 100:.1f}" if self.suite_scaled(suite) else f"{average:.4g}"
        members = self.suite_members[suite]
        names = ", ".join(_short_task(t) for t in missing)
        detail = f"missing {names}" if len(missing) < len(members) else f"no completed {label} subtask"
        return f"{MISSING} " + self.notes.mark(
            f"{model} / {method}: {label} avg needs all {len(members)} subtasks; {detail}."
        )

    def glue_average(self, method: str, model: str) -> tuple[float, list[str]]:
        """The GLUE average (see ``suite_average``)."""
        return self.suite_average("glue", method, model)

    def suite_table(self) -> pd.DataFrame:
        """Suite average per suite × method × model that ran any task of the suite (NaN when incomplete)."""
        columns = ["suite", "method", "model", "average", "n_tasks", "n_members", "missing"]
        rows = []
        for suite, members in self.suite_members.items():
            ran = self.summary[self.summary["task"].isin(members)]
            for (method, model), _ in ran.groupby(["method", "model"]):
                average, missing = self.suite_average(suite, method, model)
                rows.append(
                    {
                        "suite": suite,
                        "method": method,
                        "model": model,
                        "average": average,
                        "n_tasks": len(members) - len(missing),
                        "n_members": len(members),
                        "missing": ",".join(missing),
                    }
                )
        return pd.DataFrame(rows, columns=columns)

    def glue_table(self, suites: pd.DataFrame) -> pd.DataFrame:
        """The GLUE rows of ``suite_table`` with the historical column names."""
        glue = suites[suites["suite"] == "glue"].rename(columns={"average": "glue_avg"})
        return glue[["method", "model", "glue_avg", "n_tasks", "missing"]].reset_index(drop=True)

    def params_and_cost(self, method: str, model: str) -> dict[str, str]:
        """Trainable params (with % of total) and median train time / peak memory over completed runs."""
        runs = self.done[(self.done["method"] == method) & (self.done["model"] == model)]
        trainable = runs["trainable"].dropna()
        if trainable.empty:
            params = MISSING
        else:
            low, high = human_count(trainable.min()), human_count(trainable.max())
            params = low if low == high else f"{low}–{high}"
            pct = 100 * trainable.median() / runs["total"].median()
            if not pd.isna(pct):
                params += f" ({pct:.3g}%)"
        parts = []
        if runs["train_s"].notna().any():
            parts.append(human_duration(runs["train_s"].median()))
        memory = runs.dropna(subset=["peak_mem_bytes"]).groupby("peak_mem_kind", dropna=False)["peak_mem_bytes"].median()
        parts += [memory_label(value, kind) for kind, value in memory.items()]
        return {"trainable": params, "cost (median train · peak mem)": " · ".join(parts) or MISSING}

    def task_table(self, task: str) -> tuple[str, pd.DataFrame]:
        """Heading and all-metrics table (model × method rows) for one task."""
        summary = self.summary[self.summary["task"] == task]
        main = _mode(summary["main_metric"])
        present = [m for m in self.metrics if summary[f"{METRIC_PREFIX}{m}.mean"].notna().any()]
        metrics = sorted(present, key=lambda m: (m != main, m))
        done = self.done[self.done["task"] == task]
        ci_header = f"{CI_LEVEL:.0%} CI"
        rows = []
        ordered = summary.sort_values(["model", "rank"], na_position="last", kind="stable")
        for r in ordered.itertuples(index=False):
            runs = done[(done["method"] == r.method) & (done["model"] == r.model)]
            row = {"model": r.model, "method": r.method, "n": str(r.n_seeds)}
            for metric in metrics:
                values = runs[METRIC_PREFIX + metric].dropna()
                row[self.metric_header(metric)] = self.cell(
                    values.mean(), values.std(), len(values), metric, expected_n=r.n_seeds
                )
                if metric == main:
                    row[ci_header] = self.ci_cell(r.score_ci95_low, r.score_ci95_high, metric)
                    row["chance"] = MISSING if pd.isna(r.chance) else self.value_text(r.chance, metric)
                    row["> chance"] = ("" if pd.isna(r.chance) else f"{AT_CHANCE} no" if r.at_chance
                                       else "yes" if pd.isna(r.vs_chance_p) else f"yes (p={r.vs_chance_p:.2g})")
            for name, other in (("lora", REFERENCE_METHOD), ("full", BASELINE_METHOD)):
                row[f"Δ {other}"] = self.diff_cell(getattr(r, f"vs_{name}_diff"), getattr(r, f"vs_{name}_ci_low"),
                                                   getattr(r, f"vs_{name}_ci_high"), getattr(r, f"vs_{name}_p"), main or "")
            row["vs best"] = ("best" if r.is_best else "≈ (n.s.)" if not pd.isna(r.vs_best_p) and r.vs_best_p >= ALPHA
                              else f"worse (p={r.vs_best_p:.2g})" if not pd.isna(r.vs_best_p) else "")
            row["protocol"] = "untuned" if r.protocol in (None, "none") or pd.isna(r.protocol) else str(r.protocol)
            row["trials"] = MISSING if pd.isna(r.trials) else str(int(r.trials))
            row["budget"] = r.budget if isinstance(r.budget, str) else MISSING
            row["chosen"] = r.chosen if isinstance(r.chosen, str) else MISSING
            if isinstance(r.chosen_at_edge, str):  # the best value is an end of the range: widen it
                row["chosen"] += " " + self.notes.mark(
                    "the chosen value is an end of the searched range (the optimum may lie outside it): "
                    "widen the method's `search:` range in conf/method/<method>.yaml")
            row["val score"] = (MISSING if pd.isna(r.val_objective)
                                else self.value_text(abs(r.val_objective), main or ""))
            row["λmax(H) at init"] = MISSING if pd.isna(r.sharpness) else f"{r.sharpness:.3g}"
            others = [f"{getattr(r, f'n_{s}')} {s}" for s in STATUSES if s != "completed" and getattr(r, f"n_{s}")]
            row["other runs"] = ", ".join(others)
            row["trainable"] = human_count(r.trainable)
            row["trainable %"] = MISSING if pd.isna(r.trainable_pct) else f"{r.trainable_pct:.3g}%"
            row["train time"] = human_duration(r.train_s_median)
            row["step time"] = human_step(r.step_s_median)
            row["÷ lora"] = MISSING if pd.isna(r.step_s_vs_lora) else f"{r.step_s_vs_lora:.2f}×"
            row["peak mem"] = memory_label(r.peak_mem_bytes_median, r.peak_mem_kind)
            row["optimizer state"] = human_bytes(r.optimizer_state_bytes_median)
            rows.append(row)
        splits = ", ".join(sorted(summary["eval_split"].dropna().unique())) or "unknown"
        heading = f"{task} — main metric: {main or 'unknown'} · eval split: {splits}"
        if task in self.task_marks:
            heading += f" {self.task_marks[task]}"
        return heading, pd.DataFrame(rows)


def build_leaderboard(
    df: pd.DataFrame,
    records_read: int | None = None,
    skipped_files: int = 0,
    source: str | None = None,
) -> Leaderboard:
    """Aggregate a ``records_frame`` into a ``Leaderboard``.

    ``records_read`` defaults to ``df.attrs["records_read"]`` (else ``len(df)``); metric
    directions come from ``df.attrs["higher_is_better"]``.
    """
    directions = dict(df.attrs.get("higher_is_better", {}))
    if records_read is None:
        records_read = int(df.attrs.get("records_read", len(df)))
    work = df.copy()
    for column in KEYS:
        work[column] = work[column].fillna("unknown").astype(str)
    work["status"] = work["status"].fillna("unknown").astype(str)
    if "chance" not in work:  # a frame built by hand or from another suite's results: no floor known
        work["chance"] = math.nan

    builder = _Builder(work, directions)
    suites = builder.suite_table()
    model_tables = {model: builder.model_table(model) for model in sorted(work["model"].unique())}
    task_tables, task_headings = {}, {}
    for task in task_order(work["task"]):
        task_headings[task], task_tables[task] = builder.task_table(task)

    status_counts = {status: int((work["status"] == status).sum()) for status in STATUSES}
    for status, n in work["status"].value_counts().items():
        status_counts.setdefault(str(status), int(n))

    problems = work[work["status"].isin(["failed", "diverged"])].copy()
    problems["error_message"] = problems["error_message"].map(first_line)
    problems = _sort_rows(problems, ["model", "task", "method", "seed"])[
        ["status", "method", "model", "task", "seed", "id", "error_type", "error_message"]
    ]

    return Leaderboard(
        summary=builder.summary,
        model_tables=model_tables,
        task_tables=task_tables,
        glue=builder.glue_table(suites),
        problems=problems,
        warnings=builder.warnings,
        friedman=builder.friedman,
        rank_tables={model: builder.rank_tables[model] for model in builder.friedman},
        status_counts=status_counts,
        footnotes=builder.notes.notes,
        records_read=records_read,
        cells=len(work),
        modal_seeds=builder.modal_seeds,
        skipped_files=skipped_files,
        source=source,
        task_headings=task_headings,
        suites=suites,
        mean_ranks=builder.ranks,
    )


def label_variants(records: list[dict]) -> list[dict]:
    """Records whose method ran with different hyper-parameters on the same model and task get the differing
    method keys in their label, `lora (r=1)` and `lora (r=8)`, so that variants are rows of their own rather
    than pooled as if they were seeds of one configuration. Returns relabelled copies; others are unchanged."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record.get("model"), record.get("method"), record.get("task")), []).append(record)
    out = []
    for group in groups.values():
        configs = [(r.get("config") or {}).get("method") or {} for r in group]
        keys = sorted({k for c in configs for k in c})
        differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
        for record, config in zip(group, configs):
            if differing:
                record = dict(record, method=f"{record.get('method')} ({', '.join(f'{k}={config.get(k)}' for k in differing)})")
            out.append(record)
    return out


def load_leaderboard(results_dir: Path, read: tuple[list[dict], list[Path]] | None = None) -> Leaderboard:
    """Read the records under ``results_dir`` and build the leaderboard; ``read``: ``require_records``'s result
    when the caller has already read them.

    Raises ``NoRecordsError`` when there is no readable record.
    """
    results_dir = Path(results_dir)
    records, skipped = read if read is not None else require_records(results_dir)
    reported = [r for r in records if is_reported(r)]  # trials choose and probes measure: neither reports
    board = build_leaderboard(
        records_frame(label_variants(reported)),
        records_read=len(records),
        skipped_files=len(skipped),
        source="runs/ beside this table",  # not an absolute path: a table rebuilt elsewhere stays byte-identical
    )
    roles = [(r.get("tuning") or {}).get("role") for r in records]
    board.trial_records, board.probe_records = roles.count("trial"), roles.count("probe")
    board.warnings += unreported_studies(records)
    return board


def unreported_studies(records: list[dict]) -> list[str]:
    """A line per tuned cell whose trials all ended without a completed one (so it has no reported run and would
    otherwise vanish from the table)."""
    trials: dict[tuple, list[dict]] = {}
    finals = set()
    for r in records:
        tuning = r.get("tuning") or {}
        key = (r.get("model"), r.get("task"), r.get("method"), tuning.get("protocol"))
        if tuning.get("role") == "trial":
            trials.setdefault(key, []).append(r)
        elif tuning.get("role") == "final":
            finals.add(key)
    lines = []
    for key, runs in sorted(trials.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        statuses = [str(r.get("status")) for r in runs]
        if key not in finals and "completed" not in statuses and not {"running", "preempted"} & set(statuses):
            counts = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
            lines.append(f"{key[0]} / {key[1]} / {key[2]}: NO REPORTED RUN — none of its {len(runs)} tuning trials "
                         f"({key[3]}) completed ({counts}); see the trial records' errors.")
    return lines


def write_leaderboard(results_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write ``leaderboard.{md,csv,html}`` for ``results_dir`` into ``out_dir`` (default: ``results_dir``)."""
    board = load_leaderboard(results_dir)
    return board.write(Path(out_dir) if out_dir is not None else Path(results_dir))

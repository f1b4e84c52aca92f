"""The merge report: how much of each member adapter's score survives each merger, per fine-tuning method.

    python -m analysis merge --results results/merge     → merge.md, merge.csv, merge_normalized.{png,pdf}

Reads the records of merge cells (bench/merge.py: task `merge/<members>/<merger>`); the member runs beside them are
ordinary records and are listed by the leaderboard, not here. A member's normalized score is the merged model's
main metric on that member's eval split over the rebuilt member's own (1.0: nothing lost); the average is over the
members. Over seeds, mean ± sample std (n = the seeds; n = 1 has no spread, and no ranking should be read from
differences smaller than the member scores' own seed noise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.records import is_reported, latest_per_cell, report_dir, require_records, require_rows

MISSING = "–"


def merge_rows(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per completed merge record: its members, merger, method, model, seed and scores."""
    rows = []
    for r in latest_per_cell(records):
        merge = r.get("merge") or {}
        if r.get("status") != "completed" or not merge or not is_reported(r):
            continue
        metrics = r.get("metrics") or {}
        row: dict[str, Any] = {
            "members": str(r["task"]).rsplit("/", 1)[0], "merger": merge.get("merger"), "method": r.get("method"),
            "model": r.get("model"), "seed": r.get("seed"), "scale": merge.get("scale"),
            "density": merge.get("density"), "normalized_avg": metrics.get("normalized_avg"),
            "merged_avg": metrics.get("merged_avg"), "individual_avg": metrics.get("individual_avg")}
        for task, info in (r.get("members") or {}).items():
            row[f"{task}/normalized"] = metrics.get(f"{task}/normalized")
            row[f"{task}/merged"] = metrics.get(f"{task}/{info.get('main_metric')}")
            row[f"{task}/individual"] = metrics.get(f"{task}/individual")
        rows.append(row)
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (members, model, method, merger): seeds, and the mean and std of every score column."""
    keys = ["members", "model", "method", "merger", "scale", "density"]  # other settings are other rows, not seeds
    scores = [c for c in rows.columns if c not in (*keys, "seed")]
    grouped = rows.groupby(keys, dropna=False)
    out = grouped[scores].mean()
    std = grouped[scores].std(ddof=1).add_suffix(" std")
    return pd.concat([grouped.size().rename("n"), out, std], axis=1).reset_index()


def _pct(v: Any) -> str:
    return MISSING if v is None or pd.isna(v) else f"{100 * float(v):.1f}"


def _mean_std(mean: Any, std: Any, n: int) -> str:
    if mean is None or pd.isna(mean):
        return MISSING
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 and not pd.isna(std) else f"{100 * mean:.1f}"


def report(table: pd.DataFrame, results: Path) -> str:
    out = ["# Adapter merging", "",
           f"Merge cells in `{results}` (`python -m bench task=merge/<members> ...`, bench/merge.py). Each member "
           "is an ordinary cell trained alone; the merged backbone is scored on every member's eval split with that "
           "member's head. `norm.` = merged / individual main metric (×100; 100 = nothing lost); `avg` over the "
           "members, mean ± std over `n` seeds; `merged` and `indiv.` are the members' mean main metric (×100) of "
           "the merged model and of the members alone. λ and density: each merger's setting (tasks.merge.DEFAULTS "
           "unless set).", ""]
    for (members, model), part in table.groupby(["members", "model"], sort=True):
        tasks = sorted({c.rsplit("/", 1)[0] for c in part.columns if c.endswith("/normalized")
                        and not part[c].isna().all()})
        out += [f"## {members} on {model}", ""]
        part = part.sort_values(["method", "normalized_avg"], ascending=[True, False])
        shown = pd.DataFrame({
            "method": part["method"], "merger": part["merger"],
            "λ": part["scale"].map(lambda v: MISSING if v is None or pd.isna(v) else f"{v:g}"),
            "density": part["density"].map(lambda v: MISSING if v is None or pd.isna(v) else f"{v:g}"),
            **{f"{t} norm.": part[f"{t}/normalized"].map(_pct) for t in tasks},
            "avg norm.": [_mean_std(m, s, n) for m, s, n in zip(part["normalized_avg"], part["normalized_avg std"],
                                                               part["n"])],
            "merged": part["merged_avg"].map(_pct), "indiv.": part["individual_avg"].map(_pct), "n": part["n"],
        })
        out += [shown.to_markdown(index=False, disable_numparse=True), ""]
        scored = part.dropna(subset=["normalized_avg"])
        best = scored.loc[scored.groupby("method")["normalized_avg"].idxmax()]
        out += ["Best merger per method: " + "; ".join(
            f"{m}: {g} ({_pct(v)})" for m, g, v in zip(best["method"], best["merger"], best["normalized_avg"])) + ".",
            ""]
    return "\n".join(out)


def figure(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Normalized average by merger, one bar per method (error bars: std over seeds), one panel per member set."""
    from analysis.plots import method_color, method_label, new_figure, save, style

    groups = list(table.groupby(["members", "model"], sort=True))
    with style():
        fig, axes = new_figure(len(groups), panel_size=(3.4, 2.4), single_size=(3.6, 2.5))
        for ax, ((members, model), part) in zip(axes, groups):
            mergers = [m for m in ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "lora_lego")
                       if m in set(part["merger"])] + sorted(set(part["merger"]) - {
                           "average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "lora_lego"})
            methods = sorted(set(part["method"]))
            width = 0.8 / len(methods)
            for i, method in enumerate(methods):
                rows = part[part["method"] == method].set_index("merger")
                x = np.arange(len(mergers)) + (i - (len(methods) - 1) / 2) * width
                y = [100 * rows["normalized_avg"].get(m, np.nan) for m in mergers]
                err = [100 * rows["normalized_avg std"].get(m, np.nan) for m in mergers]
                ax.bar(x, y, width, yerr=np.nan_to_num(err), color=method_color(method), label=method_label(method),
                       capsize=2, linewidth=0)
            ax.axhline(100, color="0.3", linestyle="--", linewidth=0.8)
            ax.set_xticks(np.arange(len(mergers)), [m.replace("_", " ") for m in mergers], rotation=30, ha="right")
            ax.set_ylabel("Normalized score (%)")
            ax.set_title(f"{members} ({model})")
            ax.legend(frameon=False, fontsize="small")
        return save(fig, out_dir, "merge_normalized")


def write_merge_report(results: Path, out_dir: Path | None = None) -> list[Path]:
    """merge.md, merge.csv and the figure of the merge cells under `results`."""
    records, _ = require_records(Path(results))
    rows = merge_rows(records)
    require_rows(rows, results, "merge", "task=merge/glue method=lora")
    table = summary(rows)
    out_dir = report_dir(results, out_dir)
    md, csv = out_dir / "merge.md", out_dir / "merge.csv"
    md.write_text(report(table, Path(results)), encoding="utf-8")
    table.to_csv(csv, index=False)
    return [md, csv, *figure(table, out_dir)]


# ------------------------------------------------------------------------------------------- continual learning


def continual_rows(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per completed continual record (bench/continual.py): its sequence, method, model, seed, transfer
    metrics and score matrix."""
    rows = []
    for r in latest_per_cell(records):
        if r.get("status") != "completed" or not r.get("stages") or not is_reported(r):
            continue
        m = r.get("metrics") or {}
        rows.append({"sequence": " → ".join(s["task"] for s in r["stages"]), "method": r.get("method"),
                     "model": r.get("model"), "seed": r.get("seed"), "average": m.get("average"),
                     "bwt": m.get("bwt"), "fwt": m.get("fwt"), "matrix": r.get("matrix"),
                     "tasks": [s["task"] for s in r["stages"]]})
    return pd.DataFrame(rows)


def continual_report(rows: pd.DataFrame, results: Path) -> str:
    out = ["# Continual learning", "",
           f"Continual cells in `{results}` (`python -m bench task=continual/<name> ...`, bench/continual.py): one "
           "model learns the tasks in turn, each stage starting from the previous stage's trained tensors with a new "
           "head. `average`: the final model on every task; `bwt`: mean change on earlier tasks since they were "
           "learnt (negative = forgetting); `fwt`: each later task learnt in sequence minus learnt alone from the "
           "pretrained model. Main metrics ×100; mean ± std over `n` seeds.", ""]
    for (sequence, model), part in rows.groupby(["sequence", "model"], sort=True):
        out += [f"## {sequence} on {model}", ""]
        grouped = part.groupby("method")
        table = pd.DataFrame({
            metric: [_mean_std(g[metric].mean(), g[metric].std(ddof=1), len(g)) for _, g in grouped]
            for metric in ("average", "bwt", "fwt")}, index=[name for name, _ in grouped])
        table["n"] = [len(g) for _, g in grouped]
        out += [table.rename_axis("method").reset_index().to_markdown(index=False, disable_numparse=True), ""]
        for method, g in grouped:  # the seed-0 (or first) matrix, to read where the forgetting happens
            first = g.sort_values("seed").iloc[0]
            tasks = first["tasks"]
            matrix = pd.DataFrame([[_pct(v) for v in row] for row in first["matrix"]],
                                  index=[f"after {t}" for t in tasks], columns=tasks)
            out += [f"{method}, seed {first['seed']}: score on each task (columns) after each stage (rows)", "",
                    matrix.rename_axis("").reset_index().to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(out)


def write_continual_report(results: Path, out_dir: Path | None = None) -> list[Path]:
    """continual.md of the continual cells under `results`."""
    records, _ = require_records(Path(results))
    rows = continual_rows(records)
    require_rows(rows, results, "continual", "task=continual/glue method=lora")
    path = report_dir(results, out_dir) / "continual.md"
    path.write_text(continual_report(rows, Path(results)), encoding="utf-8")
    return [path]

"""The unlearning report: what each method and objective forgets, what it keeps, and what it costs in fluency.

    python -m analysis unlearn --results results/unlearn     → unlearn.md, unlearn.csv, unlearn_tradeoff.{png,pdf}

Reads the records of unlearning cells (task unlearn/facts; tasks/unlearn.py, bench/unlearn.py). Each starts from
the same taught model, whose scores (`taught/...` in every record) are the table's first row. `forget` and `retain`
are the shares of facts whose value the greedy answer states (acc; ROUGE-L recall on TOFU), `p(forget)` and
`p(retain)` TOFU's per-token answer probability, `probe Δ` the change of general text's cross-entropy since the
taught model (nats per token; higher = more collateral damage), `score` the harmonic mean of (1 − forget) and
retain. Over seeds, mean ± sample std.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.records import is_reported, latest_per_cell, report_dir, require_records, require_rows

MISSING = "–"
TASK = "unlearn/facts"
SCORES = ("forget_acc", "retain_acc", "forget_rouge", "retain_rouge", "forget_prob", "retain_prob",
          "forget_ce_increase", "unlearn_score")
KEYS = ["model", "source", "forget_fraction", "method", "objective", "lr", "steps"]


def unlearn_rows(records: Sequence[Mapping[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per completed unlearning record, one row per taught model they start from)."""
    rows, taught = [], {}
    for r in latest_per_cell(records):
        if r.get("task") != TASK or r.get("status") != "completed" or not is_reported(r):
            continue
        cfg, m = r.get("config") or {}, r.get("metrics") or {}
        task = cfg.get("task") or {}
        row = {"model": r.get("model"), "source": task.get("source"), "forget_fraction": task.get("forget_fraction"),
               "method": r.get("method"), "objective": task.get("objective"),
               "lr": (cfg.get("method") or {}).get("lr"), "steps": (cfg.get("train") or {}).get("max_steps"),
               "seed": r.get("seed"), **{k: m.get(k) for k in SCORES}}
        rows.append(row)
        teacher = (r.get("taught") or {}).get("run_id")
        if teacher:
            taught[(row["model"], row["source"], row["forget_fraction"])] = {
                "model": row["model"], "source": row["source"], "forget_fraction": row["forget_fraction"],
                "teacher": teacher, **{k: m.get(f"taught/{k}") for k in SCORES if f"taught/{k}" in m}}
    return pd.DataFrame(rows), pd.DataFrame(list(taught.values()))


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per setting (KEYS): seeds, and the mean and std of every score."""
    grouped = rows.groupby(KEYS, dropna=False)
    return pd.concat([grouped.size().rename("n"), grouped[list(SCORES)].mean(),
                      grouped[list(SCORES)].std(ddof=1).add_suffix(" std")], axis=1).reset_index()


def _cell(mean: Any, std: Any = None, n: int = 1, scale: float = 100.0, digits: int = 1) -> str:
    if mean is None or pd.isna(mean):
        return MISSING
    text = f"{scale * mean:.{digits}f}"
    return f"{text} ± {scale * std:.{digits}f}" if n > 1 and std is not None and not pd.isna(std) else text


def report(table: pd.DataFrame, taught: pd.DataFrame, results: Path) -> str:
    out = ["# Knowledge unlearning", "",
           f"Unlearning cells in `{results}` (`python -m bench task=unlearn/facts ...`; tasks/unlearn.py). Every "
           "cell starts from the same taught model (first row: the model fine-tuned on every fact) and trains its "
           "method on its objective: `ga` gradient ascent on the forget set, `gd` gradient difference (ascent on "
           "forget, descent on retain), `ihl` the inverted hinge loss on forget plus retain NLL (Cha et al., arXiv "
           "2408.06621). forget / retain: share of the facts whose value the greedy answer states (×100; forget ↓, "
           "retain ↑); p(·): per-token answer probability (×100); probe Δ: general text's cross-entropy change "
           "since the taught model (nats/token ↓); score: harmonic mean of (100 − forget) and retain. "
           "Mean ± std over `n` seeds.", ""]
    for (model, source, fraction), part in table.groupby(["model", "source", "forget_fraction"], sort=True,
                                                         dropna=False):
        out += [f"## {model}, {source} facts, forget {100 * float(fraction):g}%", ""]
        part = part.sort_values("unlearn_score", ascending=False)
        cols = {"method": part["method"], "objective": part["objective"],
                "lr": part["lr"].map(lambda v: MISSING if v is None or pd.isna(v) else f"{v:g}"),
                "steps": part["steps"].map(lambda v: MISSING if v is None or pd.isna(v) else f"{int(v)}")}
        for name, key, scale, digits in (("forget", "forget_acc", 100, 1), ("retain", "retain_acc", 100, 1),
                                         ("p(forget)", "forget_prob", 100, 1), ("p(retain)", "retain_prob", 100, 1),
                                         ("probe Δ", "forget_ce_increase", 1, 3), ("score", "unlearn_score", 100, 1)):
            cols[name] = [_cell(m, s, n, scale, digits) for m, s, n in zip(part[key], part[f"{key} std"], part["n"])]
        cols["n"] = part["n"]
        shown = pd.DataFrame(cols)
        before = taught[(taught["model"] == model) & (taught["source"] == source)
                        & (taught["forget_fraction"] == fraction)] if len(taught) else taught
        if len(before):
            t = before.iloc[0]
            first = {"method": f"taught ({t['teacher']})", "objective": MISSING, "lr": MISSING, "steps": MISSING,
                     "forget": _cell(t.get("forget_acc")), "retain": _cell(t.get("retain_acc")),
                     "p(forget)": _cell(t.get("forget_prob")), "p(retain)": _cell(t.get("retain_prob")),
                     "probe Δ": _cell(0.0, scale=1, digits=3), "score": _cell(t.get("unlearn_score")), "n": 1}
            shown = pd.concat([pd.DataFrame([first]), shown], ignore_index=True)
        out += [shown.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(out)


def figure(table: pd.DataFrame, taught: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Retain against forget accuracy per (method, objective), the taught model as a star: up and left is better."""
    from analysis.plots import method_color, method_label, new_figure, save, style

    groups = list(table.groupby(["model", "source", "forget_fraction"], sort=True, dropna=False))
    markers = {"ga": "v", "gd": "s", "ihl": "o"}
    with style():
        fig, axes = new_figure(len(groups), panel_size=(3.2, 2.8), single_size=(3.6, 3.0))
        for ax, ((model, source, fraction), part) in zip(axes, groups):
            for _, row in part.iterrows():
                ax.errorbar(100 * row["forget_acc"], 100 * row["retain_acc"],
                            xerr=100 * (row["forget_acc std"] if row["n"] > 1 else 0),
                            yerr=100 * (row["retain_acc std"] if row["n"] > 1 else 0),
                            marker=markers.get(row["objective"], "D"), color=method_color(row["method"]),
                            linestyle="none", markersize=5, capsize=2,
                            label=f"{method_label(row['method'])}, {row['objective']}")
            before = taught[(taught["model"] == model) & (taught["forget_fraction"] == fraction)] if len(taught) \
                else taught
            if len(before):
                t = before.iloc[0]
                ax.plot(100 * t["forget_acc"], 100 * t["retain_acc"], marker="*", color="0.2", markersize=9,
                        linestyle="none", label="taught")
            ax.set_xlabel("Forget-set accuracy (%) ↓")
            ax.set_ylabel("Retain-set accuracy (%) ↑")
            ax.set_xlim(-5, 105)
            ax.set_ylim(-5, 105)
            ax.set_title(f"{model}, forget {100 * float(fraction):g}%")
            ax.legend(frameon=False, fontsize="x-small", loc="lower right")
        return save(fig, out_dir, "unlearn_tradeoff")


def write_unlearn_report(results: Path, out_dir: Path | None = None) -> list[Path]:
    """unlearn.md, unlearn.csv and the trade-off figure of the unlearning cells under `results`."""
    records, _ = require_records(Path(results))
    rows, taught = unlearn_rows(records)
    require_rows(rows, results, "unlearning", "task=unlearn/facts method=lora")
    table = summary(rows)
    out_dir = report_dir(results, out_dir)
    md, csv = out_dir / "unlearn.md", out_dir / "unlearn.csv"
    md.write_text(report(table, taught, Path(results)), encoding="utf-8")
    table.to_csv(csv, index=False)
    return [md, csv, *figure(table, taught, out_dir)]

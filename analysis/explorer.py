"""The interactive explorer: one self-contained HTML file per results directory (no server; it opens from disk).

    python -m analysis explore [--results results/zoo] [--out results/zoo/explorer.html]

What it shows, all from the records under --results and the method catalogue (bench/catalogue.py):
- the leaderboard (one row per method × model × task, as leaderboard.csv), sortable by any column and filtered by
  task, model, method family, tuned or not, and method name; a link can preset the filters
  (`explorer.html#task=glue/sst2&family=optimizer`);
- the score against trainable parameters, optimizer state and step time, with each task's Pareto front;
- a chosen row's training-loss and metric curves, one line per seed, with its paper, update rule and claim verdicts.

The page embeds plotly.js (the plotly package's copy, about 4.9 MB) and the data as JSON; the output depends only
on the records, the configs and the plotly version, so a rebuild from the same inputs is byte-identical.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.leaderboard import load_leaderboard
from analysis.records import is_reported, is_tuning_protocol, require_records

TEMPLATE = Path(__file__).with_name("explorer.html")
#: the method option a leaderboard label starts with: "lora (r=16)" -> lora, "peft/loha/rank8 (PEFT run)" -> peft
_BASE = re.compile(r"[A-Za-z0-9_]+")


def base_option(label: str) -> str:
    m = _BASE.match(str(label))
    return m.group(0) if m else str(label)


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def rows(summary: pd.DataFrame, methods: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows: one per leaderboard row, with the catalogue's family, paper and claims of its method."""
    out = []
    for i, r in enumerate(summary.to_dict("records")):
        base = base_option(r["method"])
        info = methods.get(base, {})
        low, high = _num(r.get("score_ci95_low")), _num(r.get("score_ci95_high"))
        protocol = r.get("protocol") if isinstance(r.get("protocol"), str) else ""
        out.append({
            "key": f"{r['method']}|{r['model']}|{r['task']}", "row": i, "method": str(r["method"]), "base": base,
            "family": info.get("family", "other"), "task": str(r["task"]), "model": str(r["model"]),
            "metric": str(r.get("main_metric", "")), "score": _num(r.get("score_mean")),
            "ci": f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "",
            "n": _num(r.get("n_completed")), "rank": _num(r.get("rank")), "trainable": _num(r.get("trainable")),
            "opt_bytes": _num(r.get("optimizer_state_bytes_median")), "step_s": _num(r.get("step_s_median")),
            "protocol": protocol or "none", "tuned": is_tuning_protocol(protocol),
            "higher": bool(r.get("higher_is_better", True)), "paper": info.get("paper", ""),
            "claims": info.get("claims", []),
        })
    return out


def curves(records: list[dict[str, Any]], keys: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Per table row, the reported runs' curves: steps and training loss, eval steps and the main metric."""
    from analysis.leaderboard import label_variants

    out: dict[str, list[dict[str, Any]]] = {}
    reported = [r for r in records if is_reported(r) and r.get("status") == "completed"]
    order = sorted(label_variants(reported),
                   key=lambda r: (str(r.get("method")), str(r.get("task")), r.get("seed") or 0))
    for r in order:
        key = f"{r.get('method')}|{r.get('model')}|{r.get('task')}"
        if key not in keys:
            continue
        curve = [c for c in r.get("curve") or [] if _num(c.get("loss")) is not None]
        metric = r.get("main_metric")
        history = [(h["step"], h["metrics"][metric]) for h in r.get("eval_history") or []
                   if _num((h.get("metrics") or {}).get(metric)) is not None]
        final = _num((r.get("metrics") or {}).get(metric))
        last = curve[-1]["step"] if curve else None
        if final is not None and last is not None and (not history or history[-1][0] < last):
            history.append((last, final))  # the final evaluation, after the last step
        out.setdefault(key, []).append({
            "seed": r.get("seed"), "steps": [c["step"] for c in curve], "loss": [round(c["loss"], 5) for c in curve],
            "eval_steps": [s for s, _ in history], "eval": [round(v, 5) for _, v in history],
        })
    return out


def method_info() -> dict[str, dict[str, Any]]:
    """The catalogue's name, family, paper, reference, rule and claims of every method option."""
    from bench.catalogue import entries

    return {e.option: {"name": e.name, "family": e.family, "paper": e.papers[0] if e.papers else "", "repo": e.repo,
                       "rule": e.rule, "claims": [list(c) for c in e.claims]} for e in entries()}


def build_html(results_dir: Path, title: str | None = None) -> str:
    """The explorer page for the records under `results_dir`."""
    from plotly.offline import get_plotlyjs

    results_dir = Path(results_dir)
    read = require_records(results_dir)
    board = load_leaderboard(results_dir, read)
    records = read[0]
    methods = method_info()
    table = rows(board.summary, methods)
    shown = {r["base"] for r in table}
    data = {
        "rows": table, "methods": {k: v for k, v in methods.items() if k in shown}, "curves": curves(records, {r["key"] for r in table}),
        "about": (f"{len(table)} method × model × task rows from {board.records_read} records "
                  f"({board.trial_records} tuning trials left out); scores are the dev-set means over seeds with "
                  "their 95% t-interval, as in leaderboard.md beside this file, which has the significance tests. "
                  f"Rebuild: python -m analysis explore --results {results_dir.as_posix()}"),
    }
    payload = json.dumps(data, sort_keys=True, separators=(",", ":")).replace("</", "<\\/")
    page = TEMPLATE.read_text().replace("__TITLE__", title or results_dir.as_posix())
    return page.replace("__DATA__", payload).replace("__PLOTLY__", get_plotlyjs())


def write_explorer(results_dir: Path, out: Path | None = None) -> Path:
    out = Path(out) if out is not None else Path(results_dir) / "explorer.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(build_html(results_dir))
    tmp.replace(out)
    return out

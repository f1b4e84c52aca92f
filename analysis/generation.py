"""The adapter-generation report: how well adapters a CVAE generates score, on seen and on held-out tasks.

    python -m analysis generate --results results/generate      → generate.md

Reads the records of generation cells (task generate/<name>; bench/generate.py). For every task: the real
adapter's score (rebuilt from its ΔW), the generated adapters' mean and best score, and their mean over the real
one (normalized); seen tasks' snapshots trained the generator, held-out tasks' never did. Main metrics ×100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.merging import _pct
from analysis.records import is_reported, latest_per_cell, report_dir, require_records, require_rows


def generation_rows(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (completed generation record, task)."""
    rows = []
    for r in latest_per_cell(records):
        if r.get("status") != "completed" or not r.get("generate") or not is_reported(r):
            continue
        m = r.get("metrics") or {}
        for task, info in (r.get("members") or {}).items():
            rows.append({"cell": r["task"], "method": r.get("method"), "model": r.get("model"), "seed": r.get("seed"),
                         "task": task, "role": "held out" if info.get("held_out") else "seen",
                         "individual": m.get(f"{task}/individual"), "generated": m.get(f"{task}/generated"),
                         "best": m.get(f"{task}/generated_best"), "normalized": m.get(f"{task}/normalized"),
                         "training_adapters": r["generate"].get("training_adapters"),
                         "reconstruction_mse": m.get("reconstruction_mse")})
    return pd.DataFrame(rows)


def generation_report(rows: pd.DataFrame, results: Path) -> str:
    out = ["# Adapter generation", "",
           f"Generation cells in `{results}` (`python -m bench task=generate/<name> ...`, bench/generate.py): a "
           "conditional VAE (ICM-LoRA, arXiv 2501.17635) learns the seen tasks' LoRA snapshots conditioned on each "
           "task's vector and generates an adapter per task; held-out tasks are never in its training data. "
           "`real`: the task's own adapter; `generated`: the mean over generated samples (`best`: the best one); "
           "`norm.` = generated / real. Main metrics ×100; mean over seeds.", ""]
    for (cell, method, model), part in rows.groupby(["cell", "method", "model"], sort=True):
        grouped = part.groupby(["role", "task"], sort=True)
        table = pd.DataFrame({
            "role": [k[0] for k, _ in grouped], "task": [k[1] for k, _ in grouped],
            "real": [_pct(g["individual"].mean()) for _, g in grouped],
            "generated": [_pct(g["generated"].mean()) for _, g in grouped],
            "best": [_pct(g["best"].mean()) for _, g in grouped],
            "norm.": [_pct(g["normalized"].mean()) for _, g in grouped], "n": [len(g) for _, g in grouped]})
        out += [f"## {cell}: {method} on {model}", "",
                f"{int(part['training_adapters'].iloc[0])} training adapters; final reconstruction MSE (standardised "
                f"entries) {part['reconstruction_mse'].mean():.4f}.", "",
                table.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(out)


def write_generation_report(results: Path, out_dir: Path | None = None) -> list[Path]:
    """generate.md of the generation cells under `results`."""
    records, _ = require_records(Path(results))
    rows = generation_rows(records)
    require_rows(rows, results, "generation", "task=generate/glue method=lora")
    path = report_dir(results, out_dir) / "generate.md"
    path.write_text(generation_report(rows, Path(results)), encoding="utf-8")
    return [path]

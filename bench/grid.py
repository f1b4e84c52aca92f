"""Grid bookkeeping: each job leaves cell.json in its Hydra output folder; at the end of a multirun the
GridSummary callback reads them all (whatever the launcher: local, submitit, SLURM) and prints one summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bench.store import atomic_write_json

CELL = "cell.json"
#: failed + diverged cells of the last grid summarised in this process (read by bench.__main__ for the exit code)
LAST_GRID_PROBLEMS: list[dict[str, Any]] = []


def write_cell_status(output_dir: str | Path, record: dict[str, Any]) -> None:
    error = record.get("error") or {}
    atomic_write_json(Path(output_dir) / CELL, {
        "id": record.get("id"), "status": "skipped" if record.get("skipped") else record.get("status"),
        "error": {"type": error.get("type"), "message": error.get("message")} if error else None,
    })


def summarize(cells: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    lines = []
    for c in cells:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
        if c["status"] in ("failed", "diverged", "running"):
            err = c.get("error") or {}
            first = str(err.get("message") or "").strip().splitlines()[:1]
            lines.append(f"  {c['status']:8s} {c['id']}: {err.get('type')}: {first[0] if first else ''}")
    head = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"grid summary: {len(cells)} cells: {head}" + ("\n" + "\n".join(lines) if lines else "")


class GridSummary(Callback):
    """Prints completed / skipped / diverged / failed cells of the multirun, with the errors."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        cells = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{CELL}"))]
        LAST_GRID_PROBLEMS[:] = [c for c in cells if c["status"] in ("failed", "diverged")]
        print(summarize(cells), flush=True)

"""The results store: one directory per run under <results_dir>/runs/, holding record.json and artifacts.

Records are written atomically (write to a temporary file in the same directory, fsync, rename), so a reader —
the leaderboard, another node of a cluster — sees either the previous record or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

RECORD = "record.json"


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` so that concurrent readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; records are shared with other users and nodes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunStore:
    """Records and artifacts of runs, keyed by run id (one directory each)."""

    def __init__(self, results_dir: str | Path) -> None:
        self.root = Path(results_dir)
        self.runs = self.root / "runs"

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def read(self, run_id: str) -> dict[str, Any] | None:
        path = self.run_dir(run_id) / RECORD
        if not path.exists():
            return None
        with open(path) as f:
            return json.load(f)

    def records(self) -> list[dict[str, Any]]:
        """Every readable record of the store (a file being replaced or a truncated one is left out)."""
        out = []
        for path in sorted(self.runs.glob(f"*/{RECORD}")):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def write(self, record: dict[str, Any]) -> Path:
        path = self.run_dir(record["id"]) / RECORD
        atomic_write_json(path, record)
        return path

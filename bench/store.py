"""The results store: one directory per run under <results_dir>/runs/, holding record.json and artifacts.

Records are written atomically (write to a temporary file in the same directory, fsync, rename), so a reader —
the leaderboard, another node of a cluster — sees either the previous record or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RECORD = "record.json"
log = logging.getLogger("bench")


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
        """The run's record, or None when there is none. An unreadable record (truncated, not JSON, not an object:
        atomic writes never leave one, a full disk or a copy can) is moved aside to record.json.corrupt-<UTC time>
        with a warning naming it, and counts as missing: the cell runs again."""
        path = self.run_dir(run_id) / RECORD
        for _ in range(3):  # another process may replace or move the file between the read and the move
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                record = json.loads(raw)
                if isinstance(record, dict):
                    return record
                problem = f"a JSON {type(record).__name__}, not an object"
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problem = f"{type(e).__name__}: {e}"
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            aside = path.with_name(f"{RECORD}.corrupt-{stamp}")
            try:
                if path.read_bytes() != raw:
                    continue  # rewritten meanwhile: read the new one
                os.replace(path, aside)
            except FileNotFoundError:
                continue
            log.warning("record %s is unreadable (%s); moved it to %s and counts it as missing: the cell runs again",
                        path, problem, aside.name)
            return None
        return None

    def records(self) -> list[dict[str, Any]]:
        """Every readable record of the store (a file being replaced or a truncated one is left out)."""
        out = []
        for path in sorted(self.runs.glob(f"*/{RECORD}")):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def write(self, record: dict[str, Any]) -> Path:
        path = self.run_dir(record["id"]) / RECORD
        atomic_write_json(path, record)
        return path

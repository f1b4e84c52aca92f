"""A truncated record.json of a finished cell is named, moved aside and the cell runs again (not a JSONDecodeError)."""

from __future__ import annotations

import json
import logging

from bench.store import RECORD, RunStore, atomic_write_json
from tests.reliability.cli import bench, records


def test_read_moves_an_unreadable_record_aside(tmp_path, caplog):
    store = RunStore(tmp_path)
    for i, text in enumerate(['{"id": "a", "status": "comp', "[1, 2]", "\x00\xff"]):
        path = store.run_dir(f"r{i}") / RECORD
        path.parent.mkdir(parents=True)
        path.write_bytes(text.encode("latin-1"))
        with caplog.at_level(logging.WARNING, logger="bench"):
            assert store.read(f"r{i}") is None
        assert not path.exists()
        (aside,) = path.parent.glob(f"{RECORD}.corrupt-*")
        assert aside.read_bytes() == text.encode("latin-1")  # kept, for a look
        assert str(path) in caplog.text and "unreadable" in caplog.text
    atomic_write_json(store.run_dir("ok") / RECORD, {"id": "ok", "status": "completed"})
    assert store.read("ok") == {"id": "ok", "status": "completed"}
    assert store.read("missing") is None


def test_a_truncated_finished_record_is_rerun(tmp_path):
    first = bench(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (path,) = (tmp_path / "runs").glob(f"*/{RECORD}")
    text = path.read_text()
    assert json.loads(text)["status"] == "completed"
    path.write_text(text[: len(text) // 2])  # a full disk, a half copy

    again = bench(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "JSONDecodeError" not in again.stderr.replace("(JSONDecodeError", "")
    assert "Traceback" not in again.stderr
    assert f"record {path} is unreadable" in again.stdout + again.stderr
    (record,) = records(tmp_path)
    assert record["status"] == "completed" and record["attempts"] == 1
    (aside,) = path.parent.glob(f"{RECORD}.corrupt-*")
    assert aside.read_text() == text[: len(text) // 2]

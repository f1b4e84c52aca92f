"""Helpers of the reliability tests: `python -m bench` as a new user types it, and the records it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

SMOKE = ("+experiment=smoke", "model=tiny_bert", "progress=false")


def env(**extra: str) -> dict[str, str]:
    """The environment of a child: one thread (the machine is shared), no full Hydra errors unless asked."""
    out = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    out.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return out


def command(results: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench", *SMOKE, f"results_dir={results}", *args]


def bench(results: Path, *args: str, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(results, *args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env(**extra_env))


def records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*/record.json"))]


def lines(text: str) -> list[str]:
    """Non-empty lines, without the warnings libraries print on import (transformers' FutureWarning)."""
    out = [line for line in text.splitlines() if line.strip()]
    return [line for i, line in enumerate(out)
            if "Warning:" not in line and not (line.strip() == "warnings.warn(" and i and "Warning:" in out[i - 1])]

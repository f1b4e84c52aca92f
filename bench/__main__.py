"""`python -m bench`: the Hydra entry point.

    python -m bench                                   # the embedded default (LoRA, SST-2, offline MiniLM)
    python -m bench +method=dora +task=glue/rte       # one cell
    python -m bench +method=lora,dora +task=glue -m   # a grid: one job per cell, GLUE suite expanded

Two conveniences on top of plain Hydra, both applied to the command line before Hydra parses it:
- `+method=X` / `+task=X` / `+model=X` (the form users type) and `method=X` (the override form) mean the same:
  these groups always have a default, so the `+` is dropped.
- `-m` may stand anywhere among the overrides (plain argparse rejects overrides after it).
- A task that is a suite (conf/task/<name>.yaml with a `suite:` list, e.g. glue) expands into its subtasks and
  turns the command into a multirun.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bench.grid import LAST_GRID_PROBLEMS, write_cell_status

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS_WITH_DEFAULTS = ("method", "task", "model")
log = logging.getLogger("bench")


def suite_members(task: str) -> list[str] | None:
    """The subtasks of a suite option (conf/task/<task>.yaml with a `suite:` key), else None."""
    path = CONF / "task" / f"{task}.yaml"
    if not path.is_file():
        return None
    suite = OmegaConf.load(path).get("suite")
    return list(suite) if suite else None


def normalize_argv(argv: list[str]) -> list[str]:
    """Drop `+` on groups that have a default; expand suites (and ask for a multirun when one is expanded)."""
    out, expanded = [], False
    for arg in argv:
        body = arg[1:] if arg.startswith("+") and not arg.startswith("++") else arg
        group, sep, value = body.partition("=")
        if sep and group in GROUPS_WITH_DEFAULTS:
            arg = body
        if sep and group == "task":
            values = []
            for v in value.split(","):
                members = suite_members(v)
                values += members or [v]
                expanded |= members is not None
            arg = f"task={','.join(values)}"
        out.append(arg)
    # argparse takes one run of positional overrides: `a=1 -m b=2` would reject `b=2`, so the flag goes first
    multirun = expanded or bool({"-m", "--multirun"} & set(out))
    rest = [a for a in out if a not in ("-m", "--multirun")]
    return ["--multirun", *rest] if multirun else rest


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> dict[str, Any]:
    from bench.run import run  # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    try:
        record = run(cfg)
    except Exception as e:
        record = {"status": "failed", "id": getattr(e, "run_id", hc.job.override_dirname),
                  "error": {"type": type(e).__name__, "message": str(e)}}
        write_cell_status(hc.runtime.output_dir, record)
        if hc.mode.name != "MULTIRUN":  # a single run fails loudly; in a grid a failing cell never stops the others
            raise
        log.exception("cell failed (its record says why); the grid goes on")
        return record
    write_cell_status(hc.runtime.output_dir, record)
    return record


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *normalize_argv(argv)]
    _hydra_main()
    if LAST_GRID_PROBLEMS:
        sys.exit(1)


if __name__ == "__main__":
    main()

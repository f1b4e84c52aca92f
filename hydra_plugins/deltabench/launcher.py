"""The `local` launcher of deltabench: the cells of a grid run one after another, each in its own Python process.

One process per cell keeps cells independent: peak memory is the cell's own (not the high-water mark of every
earlier cell in a shared process), a crash or an out-of-memory kill ends one cell and not the grid, and nothing
(allocator caches, CUDA contexts, global seeds) leaks from one cell into the next. Each child is the same
`python -m bench` with the cell's overrides and its Hydra output folder set to the sweep's job folder.

(It lives in the `hydra_plugins` namespace package because Hydra only instantiates launchers found there.)
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from bench.grid import CELL
from bench.store import atomic_write_json

log = logging.getLogger(__name__)


class SubprocessLauncher(Launcher):
    """Runs each job of a multirun as `python -m bench <overrides>` in a fresh process, sequentially."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(f"Launching {len(job_overrides)} jobs locally, one process each")
        returns = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.num = idx
            out_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
            child = subprocess.run([sys.executable, "-m", "bench", *overrides, f"hydra.run.dir={out_dir}"])
            cell_file = out_dir / CELL
            if cell_file.exists():
                cell = json.loads(cell_file.read_text())
            else:  # the child died before it could say anything (killed, out of memory)
                cell = {"id": " ".join(overrides), "status": "failed",
                        "error": {"type": "ProcessDied", "message": f"exit code {child.returncode}"}}
                atomic_write_json(cell_file, cell)
            ret = JobReturn(overrides=list(overrides), working_dir=str(out_dir), task_name="bench",
                            status=JobStatus.COMPLETED, _return_value=cell)  # a failed cell never stops the grid
            returns.append(ret)
        return returns

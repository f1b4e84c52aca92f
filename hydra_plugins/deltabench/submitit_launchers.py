"""The `slurm` and `submitit` launchers of deltabench: hydra-submitit-launcher 1.2 with three changes that a
grid of resumable cells needs.

1. The pre-time-limit / preemption signal is SIGUSR1 (submitit's default is SIGUSR2). bench/train.py checkpoints on
   SIGTERM and SIGUSR1, marks the record `preempted`, restores the handlers it replaced and re-raises the signal;
   with SUBMITIT_PREEMPT_SIGNAL=USR1 the handler it finds is submitit's `checkpoint_and_try_requeue`, which
   resubmits the job (`scontrol requeue`, counted against `max_num_timeout` when the time limit was the cause) and
   exits. The rerun of the cell resumes from <run dir>/checkpoint.pt. The sbatch line becomes
   `--signal=USR1@<signal_delay_s>`; jobs inherit the variable from the submitting process (sbatch exports the
   environment), and a job that did not inherit it still gets submitit's handler on SIGUSR1 (`_bind_preempt_signal`).
2. A cell stopped by SIGTERM (SLURM's preemption, `scontrol requeue`, `scancel`, the time limit itself) leaves no
   result: submitit ignores SIGTERM and would otherwise report the `preempted` record as the job's final result
   while SLURM runs the requeued job again. Without a result the submitting process keeps waiting while the job
   is requeued, and learns from `sacct` that it ended when it was cancelled instead.
3. A job that ends without a result (cancelled, killed for memory, node failure) does not stop the grid: its cell
   is reported `failed` with the SLURM job id, state and log path, as the `local` launcher does for a dead process.
   A rerun of the grid skips completed cells and resumes or retries the others.

(Hydra only instantiates launchers found in the `hydra_plugins` namespace package, hence the location.)
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as upstream
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict

from bench.grid import CELL
from bench.store import atomic_write_json

log = logging.getLogger(__name__)

PREEMPT_SIGNAL = "USR1"  # one of the two signals bench/train.py checkpoints on (the other, SIGTERM, SLURM's kill)


def _bind_preempt_signal() -> None:
    """In the job: make sure submitit's requeue handler answers SIGUSR1 (the job may not have inherited
    SUBMITIT_PREEMPT_SIGNAL, e.g. on a cluster whose sbatch does not export the environment)."""
    usr1 = signal.getsignal(signal.SIGUSR1)
    usr2 = signal.getsignal(signal.SIGUSR2)
    if usr1 in (signal.SIG_DFL, None) and callable(usr2):
        signal.signal(signal.SIGUSR1, usr2)


class _ResumableCells:
    """The part shared by the SLURM and the local submitit launchers (mixed in before the upstream class)."""

    _EXECUTOR: str

    # ------------------------------------------------------------------------------------------ in the job
    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[type, Singleton]) -> JobReturn:
        _bind_preempt_signal()
        ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)  # type: ignore[misc]
        value = ret._return_value if ret.status is JobStatus.COMPLETED else None
        if isinstance(value, dict) and value.get("status") == "preempted":
            # SIGTERM: the scheduler is ending this job (and requeues it if it was preempted or `scontrol
            # requeue`d). No result, so that the submitting process waits for the requeued run (or learns from
            # sacct that the job was cancelled). The checkpoint and the `preempted` record stay on disk.
            log.warning("cell %s preempted at step %s: exiting without a result", value.get("id"),
                        (value.get("error") or {}).get("step"))
            raise SystemExit(128 + signal.SIGTERM)
        return ret

    # ------------------------------------------------------------------------------------------ submitting
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from submitit.core.job_environment import JobEnvironment
        from submitit.core.utils import FailedJobError, UncompletedJobError

        assert self.config is not None and self.hydra_context is not None  # type: ignore[attr-defined]
        os.environ["SUBMITIT_PREEMPT_SIGNAL"] = PREEMPT_SIGNAL  # for the jobs (inherited through sbatch / Popen)
        JobEnvironment.USR_SIG = PREEMPT_SIGNAL  # here: sbatch --signal=USR1@<signal_delay_s>

        # the executor, exactly as hydra-submitit-launcher 1.2 builds it
        params = dict(self.params)  # type: ignore[attr-defined]
        folder = params.pop("submitit_folder")
        init = {f"{self._EXECUTOR}_max_num_timeout": params.pop("max_num_timeout")} if "max_num_timeout" in params else {}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=folder, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})

        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # type: ignore[attr-defined]
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))

        returns = []
        for job, (overrides, _, idx, _, _) in zip(jobs, job_params):
            try:
                returns.append(job.results()[0])
            except (UncompletedJobError, FailedJobError) as e:  # the job ended without a result
                returns.append(self._dead_cell(overrides, idx, job, e))
        return returns

    def _dead_cell(self, overrides: list[str], idx: int, job: Any, error: Exception) -> JobReturn:
        """Report a job that left no result as a failed cell (its record, if any, stays as the job left it)."""
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)  # type: ignore
        with open_dict(sweep_config):
            sweep_config.hydra.job.num = idx
        out_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        cell_file = out_dir / CELL
        previous = json.loads(cell_file.read_text()) if cell_file.exists() else {}
        state = job.state if self._EXECUTOR == "slurm" else "ended"
        cell = {"id": previous.get("id") or " ".join(overrides), "status": "failed",
                "error": {"type": "JobDied",
                          "message": f"{self._EXECUTOR} job {job.job_id} ended without a result (state {state}, "
                                     f"cell was {previous.get('status', 'not started')}); a rerun of the grid "
                                     f"resumes it from its checkpoint if it has one. Log: {job.paths.stderr}. "
                                     f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"}}
        atomic_write_json(cell_file, cell)
        log.error("cell %s: %s", cell["id"], cell["error"]["message"])
        return JobReturn(overrides=overrides, working_dir=str(out_dir), task_name="bench",
                         status=JobStatus.COMPLETED, _return_value=cell)  # a dead cell never stops the grid


class SlurmLauncher(_ResumableCells, upstream.SlurmLauncher):
    """hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml)."""


class LocalLauncher(_ResumableCells, upstream.LocalLauncher):
    """hydra/launcher=submitit (conf/hydra/launcher/submitit.yaml)."""

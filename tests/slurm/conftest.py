"""The one-node SLURM cluster of the `slurm` tests: started once per session under a temporary folder by
scripts/slurm/cluster.py, stopped (after the queue drains) when the session ends.

The tests are skipped, saying why, where the SLURM/MUNGE/MariaDB binaries are missing (`make test` installs them
as root with `python3 scripts/slurm/cluster.py install`) or where the session is not root (the daemons run as root).
Binaries present but a cluster that does not come up is an error, with the daemons' logs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "slurm" / "cluster.py"
BINARIES = ("munged", "mariadbd", "mariadb-install-db", "mariadb", "slurmdbd", "slurmctld", "slurmd",
            "sbatch", "srun", "squeue", "sacct", "sacctmgr", "scontrol", "scancel", "sinfo")
SBIN = "/usr/sbin:/sbin"


@dataclass
class Cluster:
    dir: Path
    partition: str
    env: dict[str, str]  # os.environ + SLURM_CONF (+ one thread per op, so CPU results are reproducible)

    def launcher(self) -> list[str]:
        """The overrides that send a grid to this cluster. mem_gb: the test machine may have less than the 16 GB a
        job asks for by default (conf/hydra/launcher/slurm.yaml)."""
        return ["hydra/launcher=slurm", f"hydra.launcher.partition={self.partition}", "hydra.launcher.mem_gb=2"]

    def bench(self, results: Path, *args: str, popen: bool = False,
              timeout: float = 900) -> subprocess.CompletedProcess | subprocess.Popen:
        """`python -m bench +experiment=smoke model=tiny_bert <args> <launcher> results_dir=<results>`."""
        cmd = [sys.executable, "-m", "bench", "+experiment=smoke", "model=tiny_bert", *args, *self.launcher(),
               f"results_dir={results}"]
        if popen:
            return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    path = os.pathsep.join([os.environ.get("PATH", ""), SBIN])
    missing = [b for b in BINARIES if shutil.which(b, path=path) is None]
    if missing:
        pytest.skip(f"SLURM/MUNGE/MariaDB not installed (missing: {' '.join(missing)}); as root: "
                    f"`python3 scripts/slurm/cluster.py install` (`make test` does it when run as root)")
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster runs its daemons as root (SlurmUser=root): run the slurm tests as root")
    d = tmp_path_factory.mktemp("slurm")
    start = subprocess.run([sys.executable, str(SCRIPT), "start", str(d)], capture_output=True, text=True,
                           timeout=300)
    if start.returncode != 0:
        subprocess.run([sys.executable, str(SCRIPT), "stop", str(d), "--timeout", "10"], timeout=120)
        pytest.fail(f"the SLURM cluster did not start:\n{start.stdout[-3000:]}\n{start.stderr[-6000:]}")
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"), PATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    partition = json.loads((d / "cluster.json").read_text())["partition"]
    try:
        yield Cluster(dir=d, partition=partition, env=env)
    finally:
        subprocess.run(["scancel", "--full", f"--partition={partition}"], env=env, capture_output=True)
        subprocess.run([sys.executable, str(SCRIPT), "stop", str(d), "--timeout", "120"], timeout=400)

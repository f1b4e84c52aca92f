#!/usr/bin/env python3
"""A real one-node SLURM cluster on this machine: for the `slurm` tests, and for trying a grid on SLURM locally.

    sudo python3 scripts/slurm/cluster.py install     # the Debian packages (apt-get; skips what is installed)
    sudo python3 scripts/slurm/cluster.py start DIR   # configure everything under DIR, start the daemons
    set -a; . DIR/env; set +a                         # SLURM_CONF=DIR/slurm.conf: sinfo, sbatch, sacct see it
    python -m bench +experiment=smoke model=tiny_bert seed=0,1 -m hydra/launcher=slurm
    sudo python3 scripts/slurm/cluster.py stop DIR    # wait until no job is left, then stop the daemons

Stdlib only; Debian 12 (Slurm 22.05, MUNGE 0.5, MariaDB 10.11); run as root (slurmd runs jobs as their users).

install
    `apt-get install -y slurmctld slurmd slurm-client munge slurmdbd mariadb-server` for the packages that
    `dpkg-query` does not report installed (nothing to do when all are; `apt-get update` once if the install fails).
    While it runs, a temporary /usr/sbin/policy-rc.d (only if there is none) keeps the packages from starting the
    system's own munge/mariadb/slurm services: this script runs private instances and needs none of them.

start DIR
    Everything lives under DIR (created if missing), nothing in /etc or /run is touched:
      slurm.conf, slurmdbd.conf (0600)  the cluster "deltabench": SlurmctldHost=localhost(127.0.0.1), one node
                                        NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=<85 % of MemTotal>,
                                        one partition `debug` (Default, MaxTime=INFINITE); SlurmUser=SlurmdUser=root,
                                        AuthType=auth/munge on DIR's own socket, proctrack/linuxproc + task/none
                                        (no cgroups: works in containers; hence no cgroup.conf), select/cons_tres with
                                        CR_Core_Memory (a job gets the cores and memory it asks for),
                                        SlurmdParameters=config_overrides (the node is CPUs=2 whatever the machine),
                                        accounting through slurmdbd (submitit asks `sacct` whether a job died:
                                        without accounting it would wait forever for a killed job).
                                        cred_expire=10 and scheduling passes every 5 s: a requeued job (preemption,
                                        submitit's requeue at the time limit) starts again ~15 s later instead of
                                        after Slurm's default 120 s.
      munge/                            munge.key (1 KiB from os.urandom, 0400), socket, pid, log, seed
      mysql/                            the MariaDB datadir (mariadb-install-db on first start); mysql.sock. A
                                        128 MB buffer pool: slurmdbd logs that it recommends more, harmless here.
      state/ spool/                     slurmctld's StateSaveLocation, slurmd's SlurmdSpoolDir
      log/                              every daemon's log (<daemon>.log from the daemon, <daemon>.out its console)
      pids.json                         the PID of each daemon this script started (what `stop` stops)
      cluster.json                      cluster name, partition, node, ports (free ports picked at start)
      env                               SLURM_CONF=DIR/slurm.conf (KEY=VALUE lines; `set -a; . DIR/env; set +a`)
    Daemons are started in the foreground (-D/-F; detached from this process, their own sessions) in this order,
    each waited for before the next: munged → mariadbd (+ a `slurm` database user) → slurmdbd →
    `sacctmgr -i add cluster deltabench` (once) → slurmctld → slurmd; then it waits until `sinfo` shows the node
    idle (about 10 s from an empty DIR once the packages are installed). A DIR whose daemons are all alive is left
    as it is. Ports are free TCP ports on 127.0.0.1, so several clusters (and a system SLURM) can coexist.

stop DIR
    Waits until `squeue` is empty (--timeout seconds, default 600; then the remaining jobs are cancelled and it
    waits again), then stops the daemons by their recorded PIDs in reverse order: SIGTERM, SIGKILL after 30 s.
    Jobs that outlive slurmd would be orphaned (proctrack/linuxproc), hence the wait.

Exit status 0 on success; on failure the message names the daemon and prints the tail of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server"]
CLUSTER, PARTITION, NODE = "deltabench", "debug", "localhost"
CPUS = 2
SBIN = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]  # start order; stop is the reverse
DB_USER, DB_PASS, DB_NAME = "slurm", "slurm", "slurm_acct_db"


# ---------------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def which(name: str) -> str | None:
    """A binary on PATH or in the sbin directories (which a non-login root shell may lack on PATH)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def binary(name: str) -> str:
    path = which(name)
    if path is None:
        sys.exit(f"{name} not found: run `{sys.argv[0]} install` first")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie has exited; its parent has not reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return True


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def env_for(d: Path) -> dict[str, str]:
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
    return env


def run(cmd: list[str], d: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env_for(d), capture_output=True, text=True, check=check, **kw)


def wait_for(what: str, ready, timeout: float, logs: list[Path], pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if pid is not None and not alive(pid):
            raise RuntimeError(f"{what} exited during start-up\n" + "\n".join(f"--- {p}\n{tail(p)}" for p in logs))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s\n"
                               + "\n".join(f"--- {p}\n{tail(p)}" for p in logs))
        time.sleep(0.3)


# ---------------------------------------------------------------------------------------------------- install
def installed(pkg: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "install ok installed"


def install() -> None:
    missing = [p for p in PACKAGES if not installed(p)]
    if not missing:
        log("all packages installed: " + " ".join(PACKAGES))
        return
    if os.geteuid() != 0:
        sys.exit("install needs root (apt-get)")
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:  # keep the packages' postinst from starting system services this script does not use
        policy.write_text("#!/bin/sh\n# temporary, written by deltabench scripts/slurm/cluster.py install\nexit 101\n")
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        log("apt-get install " + " ".join(missing))
        if subprocess.run(cmd, env=env).returncode != 0:
            log("install failed; apt-get update and retry")
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
            subprocess.run(cmd, env=env, check=True)
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    still = [p for p in PACKAGES if not installed(p)]
    if still:
        sys.exit(f"not installed: {still}")


# ---------------------------------------------------------------------------------------------------- configs
def real_memory_mb() -> int:
    """85 % of MemTotal (MB), at least 1 GB: what jobs may ask for in total."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(1024, int(int(line.split()[1]) / 1024 * 0.85))
    return 4096


def write_configs(d: Path, ports: dict[str, int]) -> None:
    munge_socket = d / "munge" / "munge.socket.2"
    auth_info = f"socket={munge_socket},cred_expire=10"
    slurm_conf = f"""\
# Written by scripts/slurm/cluster.py: a one-node cluster under {d}
ClusterName={CLUSTER}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmdPort={ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo={auth_info}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}
SlurmdPidFile={d / 'run' / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports['slurmdbd']}
AccountingStoragePass={munge_socket}
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={real_memory_mb()} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""
    slurmdbd_conf = f"""\
# Written by scripts/slurm/cluster.py
AuthType=auth/munge
AuthInfo={auth_info}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={ports['slurmdbd']}
SlurmUser=root
PidFile={d / 'run' / 'slurmdbd.pid'}
LogFile={d / 'log' / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports['mysql']}
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
"""
    (d / "slurm.conf").write_text(slurm_conf)
    dbd = d / "slurmdbd.conf"
    dbd.write_text(slurmdbd_conf)
    dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it holds the database password)
    (d / "env").write_text(f"SLURM_CONF={d / 'slurm.conf'}\n")
    (d / "cluster.json").write_text(json.dumps({"cluster": CLUSTER, "partition": PARTITION, "node": NODE,
                                                "cpus": CPUS, "ports": ports}, indent=1))


# ---------------------------------------------------------------------------------------------------- daemons
def spawn(d: Path, name: str, cmd: list[str]) -> int:
    out = open(d / "log" / f"{name}.out", "ab")
    proc = subprocess.Popen(cmd, env=env_for(d), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=d)
    out.close()
    pids = read_pids(d)
    pids[name] = proc.pid
    (d / "pids.json").write_text(json.dumps(pids, indent=1))
    return proc.pid


def read_pids(d: Path) -> dict[str, int]:
    path = d / "pids.json"
    return json.loads(path.read_text()) if path.exists() else {}


def node_state(d: Path) -> str:
    out = run(["sinfo", "-h", "-N", "-n", NODE, "-o", "%t"], d, check=False)
    return out.stdout.strip() if out.returncode == 0 else ""


def start(d: Path) -> None:
    if os.geteuid() != 0:
        sys.exit("start needs root (slurmd starts jobs as their users; SlurmUser=root)")
    d = d.resolve()
    pids = read_pids(d)
    if pids and all(alive(pids.get(n, -1)) for n in DAEMONS):
        log(f"already running under {d} (pids {pids})")
        return
    longest = d / "munge" / "munge.socket.2.lock"
    if len(str(longest)) > 100:  # AF_UNIX paths hold 107 bytes
        sys.exit(f"{d} is too deep for the munge and MariaDB sockets (at most ~80 characters)")
    if pids:
        log("some daemons of a previous start are gone: restarting all")
        stop_daemons(d)
    for sub in ("munge", "mysql", "state", "spool", "log", "run"):
        (d / sub).mkdir(parents=True, exist_ok=True)
        (d / sub).chmod(0o755 if sub == "munge" else 0o700)  # every user's jobs and commands reach munge's socket
    d.chmod(0o755)
    ports = {"slurmctld": free_port(), "slurmd": free_port(), "slurmdbd": free_port(), "mysql": free_port()}
    while len(set(ports.values())) < len(ports):
        ports["mysql"] = free_port()
    write_configs(d, ports)

    # munge: the credentials every SLURM daemon and client exchange
    key = d / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)  # only munged (root) reads the key
    sock = d / "munge" / "munge.socket.2"
    sock.unlink(missing_ok=True)  # a stale socket of a crashed munged would look ready
    pid = spawn(d, "munged", [binary("munged"), "--foreground", "--force", f"--key-file={key}",
                              f"--socket={sock}", f"--pid-file={d / 'munge' / 'munged.pid'}",
                              f"--log-file={d / 'log' / 'munged.log'}", f"--seed-file={d / 'munge' / 'munge.seed'}"])
    wait_for("munged", sock.exists, 30, [d / "log" / "munged.log", d / "log" / "munged.out"], pid)

    # MariaDB: slurmdbd's store; its own datadir, socket and port
    datadir, mysock = d / "mysql", d / "mysql.sock"
    if not (datadir / "mysql").exists():
        out = run([binary("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
                   "--auth-root-authentication-method=socket", "--skip-test-db"], d, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    pid = spawn(d, "mariadbd", [binary("mariadbd"), "--no-defaults", f"--datadir={datadir}", f"--socket={mysock}",
                                f"--port={ports['mysql']}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                                f"--pid-file={d / 'run' / 'mariadbd.pid'}", "--user=root",
                                f"--log-error={d / 'log' / 'mariadbd.log'}", "--innodb-buffer-pool-size=128M",
                                "--innodb-lock-wait-timeout=900",
                                "--skip-log-bin", "--performance-schema=OFF"])
    client = [binary("mariadb"), "--no-defaults", f"--socket={mysock}", "-u", "root"]
    wait_for("mariadbd", lambda: run([*client, "-e", "SELECT 1"], d, check=False).returncode == 0 and
             port_open(ports["mysql"]), 120, [d / "log" / "mariadbd.log", d / "log" / "mariadbd.out"], pid)
    run([*client, "-e", f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}'; "
                        f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1'; FLUSH PRIVILEGES;"], d)

    # slurmdbd (accounting) → the cluster in its database → slurmctld → slurmd
    pid = spawn(d, "slurmdbd", [binary("slurmdbd"), "-D"])
    wait_for("slurmdbd", lambda: run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], d,
                                     check=False).returncode == 0, 60,
             [d / "log" / "slurmdbd.log", d / "log" / "slurmdbd.out"], pid)
    if CLUSTER not in run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], d).stdout.split():
        run(["sacctmgr", "-i", "add", "cluster", CLUSTER], d)
    pid = spawn(d, "slurmctld", [binary("slurmctld"), "-D", "-f", str(d / "slurm.conf")])
    wait_for("slurmctld", lambda: run(["scontrol", "ping"], d, check=False).stdout.count("UP") > 0, 60,
             [d / "log" / "slurmctld.log", d / "log" / "slurmctld.out"], pid)
    pid = spawn(d, "slurmd", [binary("slurmd"), "-D", "-N", NODE, "-f", str(d / "slurm.conf")])
    wait_for("the node (sinfo: idle)", lambda: node_state(d) == "idle", 90,
             [d / "log" / "slurmd.log", d / "log" / "slurmd.out", d / "log" / "slurmctld.log"], pid)
    log(f"cluster {CLUSTER} up under {d}: partition {PARTITION}, node {NODE} idle; SLURM_CONF={d / 'slurm.conf'}")


# ---------------------------------------------------------------------------------------------------- stop
def jobs(d: Path) -> list[str]:
    out = run(["squeue", "-h", "-o", "%i %T"], d, check=False)
    return out.stdout.split("\n") if out.returncode == 0 and out.stdout.strip() else []


def wait_empty(d: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while jobs(d):
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def stop_daemons(d: Path) -> None:
    pids = read_pids(d)
    for name in reversed(DAEMONS):
        pid = pids.get(name)
        if pid is None or not alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive(pid):
            log(f"{name} ({pid}) ignored SIGTERM for 30 s: SIGKILL")
            os.kill(pid, signal.SIGKILL)
    (d / "pids.json").unlink(missing_ok=True)


def stop(d: Path, timeout: float) -> None:
    d = d.resolve()
    pids = read_pids(d)
    if not pids:
        log(f"nothing recorded in {d / 'pids.json'}: nothing to stop")
        return
    if alive(pids.get("slurmctld", -1)) and not wait_empty(d, timeout):
        left = jobs(d)
        log(f"{len(left)} jobs still queued after {timeout:.0f} s: cancelling them\n" + "\n".join(left))
        run(["scancel", "--full", "--partition", PARTITION], d, check=False)
        run(["scancel", "--full", "--state", "PENDING"], d, check=False)
        wait_empty(d, 60)
    stop_daemons(d)
    log(f"cluster under {d} stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="apt-get install the Debian packages (idempotent)")
    p = sub.add_parser("start", help="configure and start a one-node cluster under DIR")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("stop", help="wait for the queue to drain, then stop the daemons started under DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for running jobs (default 600)")
    args = parser.parse_args(argv)
    if args.cmd == "install":
        install()
    elif args.cmd == "start":
        try:
            start(args.dir)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            detail = f"\n{e.stdout}\n{e.stderr}" if isinstance(e, subprocess.CalledProcessError) else ""
            log(f"start failed: {e}{detail}")
            stop_daemons(args.dir.resolve())
            sys.exit(1)
    else:
        stop(args.dir, args.timeout)


if __name__ == "__main__":
    main()

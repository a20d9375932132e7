"""A real one-node SLURM cluster for tests: Debian's slurmctld, slurmd and munge, started as root without systemd.

The node has the machine's CPUs and memory and one fake GPU (gres `File=/dev/null`), so jobs that ask for a GPU
are really scheduled against it. The configuration goes where every SLURM command looks for it,
/etc/slurm/slurm.conf (the `srun` inside Snakemake's jobs drops SLURM_CONF from its environment), and is removed
afterwards; state, spool and logs live in a folder of the caller's. There is no accounting database: jobs are
queried with squeue/scontrol, which keep finished jobs for `MinJobAge` seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "munged", "sinfo", "sbatch", "squeue", "scontrol", "scancel")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
CONFIG = Path("/etc/slurm")
MARK = "# written by noduleflow's tests/slurm_cluster.py\n"
LOCK = Path("/run/noduleflow-slurm-test.lock")  # one test cluster per machine: they share munged and /etc/slurm


class Unavailable(RuntimeError):
    """A SLURM cluster cannot be started on this machine (the reason is the message)."""


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: its folder (state and daemon logs), node name, partitions, CPUs and memory."""

    folder: Path
    node: str
    partitions: tuple[str, ...]
    cpus: int
    memory_mb: int

    @staticmethod
    def run(*command: str) -> str:
        """Run a SLURM client command; its stdout."""
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` of a (possibly finished) job as a field -> value mapping."""
        fields = {}
        for token in self.run("scontrol", "show", "job", "--oneliner", job_id).split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields


def install_packages() -> None:
    """apt-get install the SLURM and munge packages where their programs are missing; Unavailable if impossible."""
    if all(shutil.which(name) for name in PROGRAMS):
        return
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    missing = [name for name in PROGRAMS if not shutil.which(name)]
    if missing:
        raise Unavailable(f"installed {PACKAGES} but {missing} are still missing")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _munge_works() -> bool:
    credential = subprocess.run(["munge", "-n"], capture_output=True)
    return credential.returncode == 0 and subprocess.run(["unmunge"], input=credential.stdout,
                                                         capture_output=True).returncode == 0


def _wait(what: str, ready, seconds: float, logs: list[Path]) -> None:
    deadline = time.time() + seconds
    while not ready():
        if time.time() > deadline:
            tails = "\n".join(f"--- {p}:\n{p.read_text()[-2000:]}" for p in logs if p.exists())
            raise RuntimeError(f"{what} did not happen within {seconds:.0f} s\n{tails}")
        time.sleep(0.2)


def _write_config(folder: Path, node: str, cpus: int, memory_mb: int, partitions: tuple[str, ...],
                  min_job_age: int) -> None:
    state = folder / "state"
    lines = [
        "ClusterName=noduleflow-test", f"SlurmctldHost={node}", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "AuthType=auth/munge",
        f"StateSaveLocation={state / 'ctld'}", f"SlurmdSpoolDir={state / 'd'}",
        f"SlurmctldPidFile={state / 'slurmctld.pid'}", f"SlurmdPidFile={state / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none", f"MinJobAge={min_job_age}", "ReturnToService=2", "GresTypes=gpu",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN",
        *(f"PartitionName={name} Nodes={node} MaxTime=INFINITE State=UP Default={'YES' if i == 0 else 'NO'}"
          for i, name in enumerate(partitions)),
    ]
    (CONFIG / "slurm.conf").write_text(MARK + "\n".join(lines) + "\n")
    (CONFIG / "gres.conf").write_text(f"{MARK}AutoDetect=off\nNodeName={node} Name=gpu File=/dev/null Count=1\n")
    for path in (state / "ctld", state / "d"):
        path.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def single_node_cluster(folder: Path, partitions: tuple[str, ...] = ("debug",),
                        min_job_age: int = 3600) -> Iterator[SlurmCluster]:
    """Start munged (unless one already answers), slurmctld and slurmd; stop what was started afterwards.

    The first partition is the default one; all of them hold the one node. Raises Unavailable where the machine
    cannot run a cluster (not root, no packages and no apt-get, a SLURM configuration of someone else's, a test
    cluster of another session).
    """
    if os.geteuid() != 0:
        raise Unavailable("starting slurmd and munged needs root")
    install_packages()
    with open(LOCK, "w") as lock:  # held until the cluster is stopped
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Unavailable("another test session runs its SLURM cluster on this machine") from None
        yield from _cluster(folder, partitions, min_job_age)


def _cluster(folder: Path, partitions: tuple[str, ...], min_job_age: int) -> Iterator[SlurmCluster]:
    """The body of single_node_cluster, run while this session holds the machine's test-cluster lock."""
    if (CONFIG / "slurm.conf").exists() and not (CONFIG / "slurm.conf").read_text().startswith(MARK):
        raise Unavailable(f"{CONFIG / 'slurm.conf'} configures another cluster")
    folder.mkdir(parents=True, exist_ok=True)
    node = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    _write_config(folder, node, cpus, memory_mb, partitions, min_job_age)
    cluster = SlurmCluster(folder, node, partitions, cpus, memory_mb)
    started: list[subprocess.Popen] = []
    up = False

    def start(*command: str, log: str) -> None:
        with open(folder / log, "ab") as out:
            started.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    try:
        if not _munge_works():
            MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
            os.chmod("/etc/munge/munge.key", 0o400)
            shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
            start("runuser", "-u", "munge", "--", "munged", "--foreground", log="munged.out")
            _wait("munged answering", _munge_works, 20, [folder / "munged.out"])
        start("slurmctld", "-D", log="slurmctld.out")
        start("slurmd", "-D", "-N", node, log="slurmd.out")
        logs = [folder / name for name in ("slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log")]

        def idle() -> bool:
            if any(process.poll() is not None for process in started):
                raise RuntimeError("a SLURM daemon exited:\n" + "\n".join(
                    f"--- {p}:\n{p.read_text()[-2000:]}" for p in logs if p.exists()))
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
            return result.returncode == 0 and result.stdout.split() == ["idle"] * len(partitions)

        _wait("the node becoming idle", idle, 60, logs)
        up = True
        yield cluster
    finally:
        if up:  # jobs the caller left behind
            subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True)
        for process in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
        for process in reversed(started):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
        for name in ("slurm.conf", "gres.conf"):
            (CONFIG / name).unlink(missing_ok=True)

"""A real Slurm cluster on the test machine: munged, slurmctld, and three slurmd, each in its
own network namespace with its own address on a bridge, so replicas on different "nodes" have
different addresses and are reached over real routing.

Needs root and Debian's ``slurmctld slurmd slurm-client munge`` (``scripts/install_slurm.sh``).
Everything it creates (daemons, the processes of every job, namespaces, veth pairs, the bridge)
is removed by ``stop()``, which tolerates a half-started cluster; every wait is bounded.

Run one by hand with ``python -m tests.support.slurm_cluster`` (Ctrl-C tears it down).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LOCK_FILE = "/run/serve-slurm-test-cluster.lock"
BRIDGE = "servebr0"
SUBNET = "10.77.0"
CONTROLLER_IP = f"{SUBNET}.1"
NODES = ("n1", "n2", "n3")
CPUS_PER_NODE = 2
MEMORY_MB_PER_NODE = 2000
BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scontrol",
    "scancel",
    "sinfo",
    "ip",
    "nsenter",
)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def unavailable_reason() -> str | None:
    """Why a cluster cannot run here (None: it can)."""
    missing = missing_binaries()
    if missing:
        return f"Slurm binaries missing ({', '.join(missing)}); run scripts/install_slurm.sh"
    if os.geteuid() != 0:
        return "the Slurm cluster tests need root (network namespaces, slurmd)"
    return None


def _run(
    *args: str, check: bool = True, timeout_s: float = 20.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=check)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((CONTROLLER_IP if _has_ip(CONTROLLER_IP) else "127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _has_ip(ip: str) -> bool:
    return ip in _run("ip", "-o", "addr", check=False).stdout


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Slurm test cluster: {what} not within {timeout_s:.0f}s")
        time.sleep(0.1)


class SlurmCluster:
    """Start with ``start()``, always ``stop()`` (a context manager does both)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="serve-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge.sock"
        self.node_ips = {name: f"{SUBNET}.{11 + i}" for i, name in enumerate(NODES)}
        self.namespaces = {name: f"serve-{name}" for name in NODES}
        self._munged: subprocess.Popen[bytes] | None = None
        self._slurmctld: subprocess.Popen[bytes] | None = None
        self._slurmd: dict[str, subprocess.Popen[bytes]] = {}
        self._lock: IO[str] | None = None
        self.ctld_port = 0
        self.slurmd_port = 0

    def env(self) -> dict[str, str]:
        """What Slurm's commands need to find this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Starting.

    def start(self) -> None:
        # One test cluster per machine: the bridge and namespaces have fixed names.
        self._lock = open(LOCK_FILE, "w")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise RuntimeError(f"Another Slurm test cluster is running ({LOCK_FILE})") from None
        self.stop_network()  # a previous run that was killed may have left them
        self._network()
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        self._write_conf()
        self._start_munged()
        self.start_slurmctld()
        for name in NODES:
            self.start_slurmd(name)
        _wait(self._all_idle, 30, "three idle nodes")

    def _network(self) -> None:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{CONTROLLER_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for i, name in enumerate(NODES, start=1):
            ns, host_end, node_end = self.namespaces[name], f"svh{i}", f"svn{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _run("ip", "link", "set", host_end, "master", BRIDGE)
            _run("ip", "link", "set", host_end, "up")
            _run("ip", "link", "set", node_end, "netns", ns)
            in_ns = ("ip", "netns", "exec", ns)
            _run(*in_ns, "ip", "addr", "add", f"{self.node_ips[name]}/24", "dev", node_end)
            _run(*in_ns, "ip", "link", "set", node_end, "up")
            _run(*in_ns, "ip", "link", "set", "lo", "up")
            _run(*in_ns, "ip", "route", "add", "default", "via", CONTROLLER_IP)

    def _write_conf(self) -> None:
        for sub in ("state", *(f"spool/{name}" for name in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={name} NodeAddr={ip} NodeHostname={host} CPUs={CPUS_PER_NODE} "
            f"RealMemory={MEMORY_MB_PER_NODE} State=UNKNOWN"
            for name, ip in self.node_ips.items()
        )
        r = self.root
        self.conf.write_text(
            f"""ClusterName=servetest
SlurmctldHost={host}({CONTROLLER_IP})
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=100
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=6
SlurmctldTimeout=10
MessageTimeout=5
KillWait=2
MinJobAge=300
InactiveLimit=0
MpiDefault=none
{nodes}
PartitionName=serve Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_munged(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._munged = subprocess.Popen(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'munged.pid'}",
                f"--log-file={self.root / 'munged.log'}",
                f"--seed-file={self.root / 'munged.seed'}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(self.munge_socket.exists, 10, "munged's socket")

    def start_slurmctld(self) -> None:
        self._slurmctld = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self.env()},
        )
        _wait(lambda: self.scontrol("ping").returncode == 0, 20, "slurmctld answering")

    def start_slurmd(self, name: str) -> None:
        self._slurmd[name] = subprocess.Popen(
            # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup tree slurmd needs
            [
                "nsenter",
                f"--net=/run/netns/{self.namespaces[name]}",
                *("slurmd", "-D", "-N", name, "-f", str(self.conf)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self.env()},
        )

    # Chaos.

    def kill_slurmd(self, name: str) -> None:
        """The node is lost to Slurm: its slurmd dies (the jobs' processes live on)."""
        proc = self._slurmd.pop(name, None)
        if proc is not None:
            proc.kill()
            proc.wait(10)

    def cut_network(self, name: str) -> None:
        """The node's link goes down: packets to and from it are lost, nothing is closed."""
        _run("ip", "link", "set", self._host_end(name), "down")

    def restore_network(self, name: str) -> None:
        _run("ip", "link", "set", self._host_end(name), "up")

    def _host_end(self, name: str) -> str:
        return f"svh{NODES.index(name) + 1}"

    def namespace_pids(self, name: str) -> list[int]:
        out = _run("ip", "netns", "pids", self.namespaces[name], check=False).stdout
        return [int(pid) for pid in out.split()]

    def replica_pids_in(self, name: str) -> list[int]:
        """serve-replica processes running on this node."""
        found = []
        for pid in self.namespace_pids(name):
            with contextlib.suppress(OSError):
                if b"-m\x00replica" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def heal(self) -> None:
        """slurmctld, every slurmd and every node's link up again and every node idle (after a
        test broke one)."""
        self.ensure_slurmctld()
        for name in NODES:
            self.restore_network(name)
        for name in NODES:
            if name not in self._slurmd:
                self.start_slurmd(name)
        for name, state in self.node_states().items():
            if not state.startswith("IDLE"):
                self.scontrol("update", f"NodeName={name}", "State=RESUME")
        _wait(self._all_idle, 30, "three idle nodes again")

    def restart_slurmctld(self) -> None:
        self.stop_slurmctld()
        self.start_slurmctld()

    def ensure_slurmctld(self) -> None:
        """slurmctld running (a test that stopped it may have failed before it restarted it)."""
        if self._slurmctld is None or self._slurmctld.poll() is not None:
            self.start_slurmctld()

    def stop_slurmctld(self) -> None:
        """slurmctld goes away (jobs keep running); ``start_slurmctld()`` brings it back."""
        assert self._slurmctld is not None
        self._slurmctld.terminate()
        self._slurmctld.wait(20)

    def kill_namespace_processes(self, name: str) -> None:
        for pid in self.namespace_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # Looking.

    def scontrol(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["scontrol", *args],
            capture_output=True,
            text=True,
            timeout=15,
            env={**os.environ, **self.env()},
        )

    def squeue(self) -> list[tuple[str, str, str, str]]:
        """(job id, state, node, name) of every job Slurm still lists."""
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i|%T|%N|%j"],
            capture_output=True,
            text=True,
            timeout=15,
            env={**os.environ, **self.env()},
        ).stdout
        return [tuple(line.split("|", 3)) for line in out.splitlines() if line]  # type: ignore[misc]

    def all_jobs(self) -> dict[int, dict[str, str]]:
        """Every job Slurm still knows, ended ones included (for MinJobAge), by id: its
        ``scontrol show job`` fields (JobName, JobState, NodeList, ...)."""
        out = self.scontrol("-o", "show", "jobs").stdout
        jobs = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "JobId" in fields:
                jobs[int(fields["JobId"])] = fields
        return jobs

    def all_job_ids(self) -> list[int]:
        """What was ever submitted (as far as Slurm remembers)."""
        return sorted(self.all_jobs())

    def node_states(self) -> dict[str, str]:
        out = self.scontrol("-o", "show", "nodes").stdout
        states = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            states[fields.get("NodeName", "?")] = fields.get("State", "?")
        return states

    def _all_idle(self) -> bool:
        states = self.node_states()
        return len(states) == len(NODES) and all(s.startswith("IDLE") for s in states.values())

    def node_of_ip(self, ip: str) -> str:
        return next(name for name, node_ip in self.node_ips.items() if node_ip == ip)

    # Stopping.

    def stop(self) -> None:
        """Remove everything, whatever state the cluster is in."""
        for name in NODES:
            proc = self._slurmd.pop(name, None)
            if proc is not None:
                _end(proc)
            if self._lock is not None and Path(f"/run/netns/{self.namespaces[name]}").exists():
                self.kill_namespace_processes(name)
        for proc in (self._slurmctld, self._munged):
            if proc is not None:
                _end(proc)
        self._slurmctld = self._munged = None
        if self._lock is not None:
            self.stop_network()
            self._lock.close()
            self._lock = None
        shutil.rmtree(self.root, ignore_errors=True)

    def stop_network(self) -> None:
        for i, name in enumerate(NODES, start=1):
            ns = self.namespaces[name]
            if Path(f"/run/netns/{ns}").exists():
                self.kill_namespace_processes(name)
                _run("ip", "netns", "delete", ns, check=False)
            _run("ip", "link", "delete", f"svh{i}", check=False)
        _run("ip", "link", "delete", BRIDGE, check=False)


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    with SlurmCluster() as cluster:
        yield cluster


if __name__ == "__main__":
    with running_cluster() as cluster:
        print(f"Slurm cluster up: SLURM_CONF={cluster.conf}; Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)

"""A real Slurm (munged + slurmctld + slurmd) in a private directory: one node on 127.0.0.1, or
a controller and N nodes, each in its own network namespace with its own address.

Why a private directory for everything (munge key, socket, state, spool, logs, ports): the tests
must not depend on, or disturb, a Slurm or munge that the machine may already run. The node
lines (CPUs, memory) come from ``slurmd -C`` so a node never drains for claiming more than the
machine has. Every daemon is stopped by the PID it wrote.

The multi-node form (``LocalSlurm.start_on_lan``) puts ``slurmctld`` and one ``slurmd -N <node>``
per node in the namespaces of a ``tests.cluster.netns.Lan``; Slurm knows each node by its address
(NodeAddr), while the hostname, shared by all namespaces, resolves to loopback everywhere, so a
script that finds a peer by hostname instead of NodeAddr fails here as it would on a cluster.
One munged serves every node through its socket on the shared filesystem, as one key would.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from preprocessing.local_ray import free_port
from tests.cluster import netns

REQUIRED_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "srun",
                     "sinfo", "runuser")


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (missing packages, not root, ...)."""


def missing_prerequisites(multi_node: bool = False) -> Optional[str]:
    """A sentence saying why a local Slurm cannot start here, or None when it can."""
    absent = [d for d in REQUIRED_BINARIES
              if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return ("Slurm/munge binaries missing: %s (run `bash scripts/system_deps.sh` as root)"
                % ", ".join(absent))
    if os.geteuid() != 0:
        return "a local slurmd must run as root (SlurmdUser=root) to launch job steps"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' system user (the Debian munge package creates it)"
    return netns.missing_prerequisites() if multi_node else None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def ensure_hostname_is_loopback(hostname: str) -> Optional[str]:
    """Make ``hostname`` resolve to 127.0.0.1, as the single-node config requires; return what
    was done.

    Slurm addresses the node by NodeAddr=127.0.0.1, but job steps and `scontrol show hostnames`
    hand out the node *name*, and torchrun/Ray resolve it. If it resolves elsewhere we add one
    /etc/hosts line, only as root (CI); otherwise we refuse with the reason.
    """
    try:
        addr = socket.gethostbyname(hostname)
    except OSError:
        addr = None
    if addr == "127.0.0.1":
        return None
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"hostname {hostname!r} resolves to {addr}, not 127.0.0.1, and "
                               "we are not root to add an /etc/hosts entry")
    with open("/etc/hosts", "a") as hosts:
        hosts.write(f"\n127.0.0.1 {hostname}  # added by vwlmm tests/cluster (local Slurm)\n")
    return f"added '127.0.0.1 {hostname}' to /etc/hosts (it resolved to {addr})"


def _node_hardware() -> str:
    """``CPUs=.. Boards=.. ... RealMemory=..`` as slurmd detects it, memory minus 5% headroom."""
    out = subprocess.run([_binary("slurmd"), "-C"], check=True, capture_output=True,
                         text=True).stdout.splitlines()[0]
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    keep = ["CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"]
    hw = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
    return f"{hw} RealMemory={int(int(fields['RealMemory']) * 0.95)}"


# %n is the node name: several slurmd share one machine (and this directory) on a Lan.
SLURM_CONF = """\
ClusterName=ci
SlurmctldHost={ctld_host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
{comm_params}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Job ids (and the ports cluster/slurm/common.sh derives from them) start at a random number,
# so that test clusters of concurrent sessions on one machine do not hand out the same ports.
FirstJobId={first_job_id}
# Short timeouts: a test waits on these, a production cluster would not.
KillWait=10
# Ended jobs stay known to scontrol (state, exit code) for an hour: a test may start a job early
# and look at it long after it ended.
MinJobAge=3600
SlurmdTimeout={slurmd_timeout}
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""
# On loopback the daemons bind 127.0.0.1 only (they share the machine's namespace). On a Lan each
# listens inside its own namespace, which holds only its address and loopback; there the bind
# must not follow the hostname, which resolves to 127.0.0.1.
LOOPBACK_ONLY = "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"


# Job states after which a job runs no more (a requeued job goes back to PENDING instead).
JOB_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
             "PREEMPTED", "BOOT_FAIL", "DEADLINE")


@dataclass
class LocalSlurm:
    """A running test cluster. ``nodes``: node name -> NodeAddr. ``env`` and ``client`` are
    what a client command (sbatch, scontrol) needs: its environment and, on a Lan, the
    controller's namespace to run in (the machine's own namespace has no route to the Lan)."""

    root: Path
    host: str
    conf: Path
    nodes: Dict[str, str]
    lan: Optional[netns.Lan] = None
    notes: List[str] = field(default_factory=list)

    CONTROLLER = "ctl"  # the controller's host on a Lan

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def client(self) -> List[str]:
        return self.lan[self.CONTROLLER].enter if self.lan else []

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def start(cls, root: Path, timeout: float = 60.0) -> "LocalSlurm":
        """One node, named after the machine, on 127.0.0.1."""
        why = missing_prerequisites()
        if why:
            raise SlurmUnavailable(why)
        host = socket.gethostname()
        notes = [n for n in [ensure_hostname_is_loopback(host)] if n]
        self = cls(root=Path(root), host=host, conf=Path(root) / "slurm.conf",
                   nodes={host: "127.0.0.1"}, notes=notes)
        return self._launch(timeout, ctld_addr="127.0.0.1", ctld_port=free_port(),
                            slurmd_port=free_port(), comm_params=LOOPBACK_ONLY)

    @classmethod
    def start_on_lan(cls, root: Path, num_nodes: int = 2, slurmd_timeout: int = 300,
                     timeout: float = 60.0) -> "LocalSlurm":
        """A controller and nodes ``node1..nodeN``, each in its own network namespace."""
        why = missing_prerequisites(multi_node=True)
        if why:
            raise SlurmUnavailable(why)
        names = [f"node{i + 1}" for i in range(num_nodes)]
        lan = netns.Lan.create([cls.CONTROLLER] + names)
        self = cls(root=Path(root), host=socket.gethostname(), conf=Path(root) / "slurm.conf",
                   nodes={n: lan[n].addr for n in names}, lan=lan)
        # Every daemon has a namespace of its own: Slurm's default ports cannot clash.
        return self._launch(timeout, ctld_addr=lan[cls.CONTROLLER].addr, ctld_port=6817,
                            slurmd_port=6818, comm_params="", slurmd_timeout=slurmd_timeout)

    def _launch(self, timeout: float, slurmd_timeout: int = 300, **conf) -> "LocalSlurm":
        root = self.root
        # munged refuses sockets in directories that are not world-executable and keys that
        # others can read: the directory is 0755 and owned by munge, the key 0400.
        munge_dir = root / "munge"
        for sub in ("state", "spool", "run", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (root / "spool" / node).mkdir(exist_ok=True)
        munge_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(munge_dir, 0o755)
        shutil.chown(munge_dir, "munge", "munge")
        key = munge_dir / "munge.key"
        try:
            _run(["runuser", "-u", "munge", "--", _binary("mungekey"), "--create",
                  f"--keyfile={key}"])
            os.chmod(key, 0o400)
            # On a Lan munged runs in the controller's namespace too, so that deleting the
            # namespaces (netns.remove_stale) reaps every daemon of a session that died.
            _run(self.client + [
                "runuser", "-u", "munge", "--", _binary("munged"), f"--key-file={key}",
                f"--socket={munge_dir}/munge.socket", f"--pid-file={munge_dir}/munged.pid",
                f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"])
            hardware = _node_hardware()
            self.conf.write_text(SLURM_CONF.format(
                root=root, ctld_host=self.host, slurmd_timeout=slurmd_timeout,
                first_job_id=random.randint(1, 1_000_000),
                node_lines="\n".join(f"NodeName={n} NodeAddr={a} {hardware} State=UNKNOWN"
                                     for n, a in self.nodes.items()),
                node_names=",".join(self.nodes), **conf))
            _run(self.client + [_binary("slurmctld")], env=self.env)
            for node in self.nodes:
                self.start_slurmd(node)
            self.wait_nodes(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_slurmd(self, node: str) -> None:
        if self.lan:
            _run(self.lan[node].enter + [_binary("slurmd"), "-N", node], env=self.env)
        else:
            _run([_binary("slurmd")], env=self.env)

    def wait_nodes(self, timeout: float, nodes: Optional[Sequence[str]] = None,
                   states: Sequence[str] = ("idle",)) -> None:
        """Until every node (or ``nodes``) is in one of ``states`` (sinfo's %T, where a
        trailing ``*`` means not responding)."""
        nodes = list(nodes or self.nodes)
        deadline = time.monotonic() + timeout
        seen: Dict[str, str] = {}
        while time.monotonic() < deadline:
            res = self.run_client(["sinfo", "-h", "-N", "-o", "%N %T"])
            seen = dict(line.split() for line in res.stdout.splitlines() if line.strip())
            if res.returncode == 0 and all(seen.get(n) in states for n in nodes):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes {nodes} not {'/'.join(states)} after {timeout:.0f}s "
                               f"(states {seen}); logs:\n{self.logs()}")

    def pids(self) -> Dict[str, int]:
        """Daemon -> PID, from the pid files the daemons wrote (``slurmd:<node>`` per node)."""
        files = {f"slurmd:{n}": self.root / f"run/slurmd-{n}.pid" for n in self.nodes}
        files.update(slurmctld=self.root / "run/slurmctld.pid",
                     munged=self.root / "munge/munged.pid")
        out = {}
        for name, path in files.items():
            try:
                out[name] = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return out

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM each daemon by PID (slurmds first), SIGKILL what outlives ``timeout``; on a
        Lan, then kill whatever still runs in its namespaces and remove them."""
        try:
            pids = self.pids()
            order = [f"slurmd:{n}" for n in self.nodes] + ["slurmctld", "munged"]
            for name in order:
                pid = pids.get(name)
                if pid is None or not _alive(pid):
                    continue
                _signal(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    _signal(pid, signal.SIGKILL)
        finally:
            if self.lan:
                self.lan.destroy()

    # ---------------------------------------------------------------- node failure
    def kill_node(self, node: str) -> List[int]:
        """A node dies at once: its cable is cut (peers get no FIN, no RST, only silence) and
        every process in its namespace, slurmd included, is SIGKILLed. Returns their PIDs."""
        self.lan.cut(node)
        return self.lan.kill_all(node)

    def kill_jobs_on(self, node: str) -> List[int]:
        """SIGKILL every process of every job on a node (all but Slurm's own daemons), as an
        OOM killer gone wild would; the node itself stays up. Returns their PIDs."""
        return self.lan.kill_all(node, spare=("slurmd", "slurmstepd"))

    def revive_node(self, node: str, timeout: float = 60.0) -> None:
        """The node boots again: cable back, a fresh slurmd; Slurm returns it to service (idle,
        or busy with a job it still holds)."""
        self.lan.plug(node)
        self.start_slurmd(node)
        self.run_client(["scontrol", "update", f"NodeName={node}", "State=RESUME"])
        self.wait_nodes(timeout, [node], ("idle", "mixed", "allocated", "completing"))

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("log/*.log")) + [self.root / "munge/munged.log"]:
            if path.exists():
                parts.append(f"--- {path.name} (tail)\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # ---------------------------------------------------------------- client helpers
    def run_client(self, cmd: Sequence[str], env: Optional[dict] = None, **kw
                   ) -> subprocess.CompletedProcess:
        """A Slurm client command (from the controller's namespace on a Lan)."""
        return subprocess.run(self.client + list(cmd), env={**self.env, **(env or {})},
                              capture_output=True, text=True, **kw)

    def sbatch(self, args: Sequence[str], *, wait: bool = True, env: Optional[dict] = None,
               cwd: Optional[Path] = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """``sbatch --parsable args``; with ``wait``, also wait until the job has ended and
        return its exit code (128 + signal if a signal ended it) as the return code.

        Waits by polling ``scontrol`` rather than with ``sbatch --wait``, whose poll interval
        grows to 32 s, which would add up to half a minute per job.
        """
        res = self.run_client(["sbatch", "--parsable", *args], env=env, cwd=cwd, timeout=60)
        if not wait or res.returncode != 0:
            return res
        res.returncode = self.wait_job(job_id(res), timeout)
        return res

    def wait_job(self, job_id: str, timeout: float = 600) -> int:
        """Wait until the job has ended (cancelling it if the wait fails); its exit code, 128 +
        signal if a signal ended it."""
        with self.cancelled_unless_ended(job_id):
            self.wait_job_state(job_id, JOB_ENDED, timeout=timeout)
        code, _, sig = self.job_field(job_id, "ExitCode").partition(":")
        return int(code) or (128 + int(sig) if sig and int(sig) else 0)

    @contextlib.contextmanager
    def cancelled_unless_ended(self, job_id: str):
        """Cancel the job if the block raises while it still runs (a test that gave up on it
        must not leave it holding the nodes for the next one)."""
        try:
            yield
        except BaseException:
            if self.job_field(job_id, "JobState") not in JOB_ENDED + ("COMPLETING",):
                self.run_client(["scancel", job_id])
            raise

    def job_field(self, job_id: str, name: str) -> str:
        """One ``Key=Value`` field of ``scontrol show job`` ('' when the job is gone)."""
        res = self.run_client(["scontrol", "show", "job", "-o", job_id])
        m = re.search(rf"\b{name}=(\S*)", res.stdout)
        return m.group(1) if m else ""

    def wait_job_state(self, job_id: str, states: Sequence[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        unknown_since = None
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            if state:
                unknown_since = None
            elif unknown_since is None:
                unknown_since = time.monotonic()
            elif time.monotonic() - unknown_since > 10:  # not a passing scontrol failure
                raise LookupError(f"job {job_id} is unknown to slurmctld:\n{self.logs()}")
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} state {state!r}, not in {list(states)} after "
                           f"{timeout:.0f}s")


def job_id(res: subprocess.CompletedProcess) -> str:
    """The job id ``sbatch --parsable`` printed."""
    return res.stdout.strip().split(";")[0]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it ended meanwhile
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _run(cmd: List[str], env: Optional[dict] = None) -> None:
    """Run a daemon launcher (it forks and returns) and fail loudly with its output."""
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(cmd)} exited {res.returncode}: "
                               f"{res.stderr.strip() or res.stdout.strip()}")

"""A real single-node Slurm (munged + slurmctld + slurmd) on 127.0.0.1, in a private directory.

Why a private directory for everything (munge key, socket, state, spool, logs, ports): the tests
must not depend on, or disturb, a Slurm or munge that the machine may already run. The config
follows ARCHITECTURE.md §4; the node line (CPUs, memory) comes from ``slurmd -C`` so the node
never drains for claiming more than the machine has. Every daemon is stopped by the PID it wrote.
"""

from __future__ import annotations

import os
import pwd
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

REQUIRED_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "srun",
                     "sinfo", "runuser")


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (missing packages, not root, ...)."""


def missing_prerequisites() -> Optional[str]:
    """A sentence saying why a local Slurm cannot start here, or None when it can."""
    absent = [d for d in REQUIRED_BINARIES if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return ("Slurm/munge binaries missing: %s (run `bash scripts/system_deps.sh` as root)"
                % ", ".join(absent))
    if os.geteuid() != 0:
        return "a local slurmd must run as root (SlurmdUser=root) to launch job steps"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' system user (the Debian munge package creates it)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def ensure_hostname_is_loopback(hostname: str) -> Optional[str]:
    """Make ``hostname`` resolve to 127.0.0.1, as the §4 config requires; return what was done.

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


SLURM_CONF = """\
ClusterName=ci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Short timeouts: a test waits on these, a production cluster would not.
KillWait=10
MinJobAge=60
NodeName={host} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    """A running test cluster; ``env`` is what a client command (sbatch, scontrol) needs."""

    root: Path
    host: str
    conf: Path
    notes: List[str] = field(default_factory=list)

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def start(cls, root: Path, timeout: float = 60.0) -> "LocalSlurm":
        why = missing_prerequisites()
        if why:
            raise SlurmUnavailable(why)
        host = socket.gethostname()
        notes = [n for n in [ensure_hostname_is_loopback(host)] if n]
        root = Path(root)
        # munged refuses sockets in directories that are not world-executable and keys that
        # others can read: the directory is 0755 and owned by munge, the key 0400.
        munge_dir = root / "munge"
        for sub in ("state", "spool", "run", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        munge_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(munge_dir, 0o755)
        shutil.chown(munge_dir, "munge", "munge")
        key = munge_dir / "munge.key"
        _run(["runuser", "-u", "munge", "--", _binary("mungekey"), "--create",
              f"--keyfile={key}"])
        os.chmod(key, 0o400)
        self = cls(root=root, host=host, conf=root / "slurm.conf", notes=notes)
        try:
            _run(["runuser", "-u", "munge", "--", _binary("munged"), f"--key-file={key}",
                  f"--socket={munge_dir}/munge.socket", f"--pid-file={munge_dir}/munged.pid",
                  f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"])
            self.conf.write_text(SLURM_CONF.format(
                host=host, root=root, ctld_port=free_port(), slurmd_port=free_port(),
                hardware=_node_hardware()))
            _run([_binary("slurmctld")], env=self.env)
            _run([_binary("slurmd")], env=self.env)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env,
                                 capture_output=True, text=True)
            state = (res.stdout or res.stderr).strip()
            if res.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"node not idle after {timeout:.0f}s (state {state!r}); "
                               f"logs:\n{self.logs()}")

    def pids(self) -> Dict[str, int]:
        """Daemon name -> PID, from the pid files the daemons wrote."""
        files = {"slurmd": self.root / "run/slurmd.pid",
                 "slurmctld": self.root / "run/slurmctld.pid",
                 "munged": self.root / "munge/munged.pid"}
        out = {}
        for name, path in files.items():
            try:
                out[name] = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return out

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM each daemon by PID (slurmd first), SIGKILL what outlives ``timeout``."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids().get(name)
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("log/*.log")) + [self.root / "munge/munged.log"]:
            if path.exists():
                parts.append(f"--- {path.name} (tail)\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # ---------------------------------------------------------------- client helpers
    def sbatch(self, args: Sequence[str], *, wait: bool = True, env: Optional[dict] = None,
               cwd: Optional[Path] = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """``sbatch [--wait] --parsable args``; with --wait the return code is the job's."""
        cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + list(args)
        return subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, text=True,
                              capture_output=True, timeout=timeout)

    def job_field(self, job_id: str, name: str) -> str:
        """One ``Key=Value`` field of ``scontrol show job`` ('' when the job is gone)."""
        res = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env,
                             capture_output=True, text=True)
        m = re.search(rf"\b{name}=(\S*)", res.stdout)
        return m.group(1) if m else ""

    def wait_job_state(self, job_id: str, states: Sequence[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} state {state!r}, not in {list(states)} after "
                           f"{timeout:.0f}s")


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

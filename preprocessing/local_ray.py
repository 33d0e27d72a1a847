"""Private Ray clusters on 127.0.0.1 with token auth: a head for the demo and the tests, and the
local Ray that ``vwlmm-preprocess`` starts when it joins no cluster.

Ray silently replaces ``--node-ip-address=127.0.0.1`` with the machine's address; with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and ``RAY_AUTH_MODE=token`` exported (for the head and for
every client) it binds loopback only, with token auth. Token auth needs a token that Ray does not
create for ``ray start`` (and that ``ray.init`` would write to ``~/.ray/auth_token``, readable by
every later process of the user): each cluster started here gets its own random token, written
with mode 0600 into the cluster's private temp folder and handed to the head and every client as
``RAY_AUTH_TOKEN_PATH``. Nothing reads or writes ``~/.ray``.

Every port is chosen free and explicit so several heads (parallel test runs) never collide, and
the head is ``ray start --head --block`` under our own PID: stopping that PID stops exactly this
head, never another Ray on the machine (``ray stop`` would end them all).
"""

from __future__ import annotations

import os
import contextlib
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count: int, avoid: Iterable[int] = ()) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1 (Ray's worker port range),
    none of them in ``avoid`` (ports already handed to other components: Ray refuses overlaps)."""
    avoid = set(avoid)
    for _ in range(50):
        base = random.randint(20000, 40000)
        if avoid.intersection(range(base, base + count)):
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


# Variables that would point a process at another cluster or another token than ours.
_FOREIGN_RAY_VARS = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
TOKEN_FILE = "auth_token"


def ray_env(pythonpath: Optional[str] = None, **extra: str) -> Dict[str, str]:
    """The environment for a loopback Ray head and its clients, without a token yet
    (``LocalRayHead.env`` adds the head's own)."""
    env = dict(os.environ)
    for name in _FOREIGN_RAY_VARS:
        env.pop(name, None)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               PATH=f"{BIN}:{env.get('PATH', '')}", **extra)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def write_token_file(folder: str) -> str:
    """A fresh random token in ``folder/auth_token``, created with mode 0600 (never widened by
    the umask, never an existing file), flushed to disk; returns its path."""
    path = os.path.join(folder, TOKEN_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
        f.flush()
        os.fsync(f.fileno())
    return path


@contextlib.contextmanager
def private_local_ray(**init_kwargs) -> Iterator[None]:
    """``ray.init()`` of a new single-machine Ray bound to 127.0.0.1 with its own token.

    The token file lives in a 0700 temp folder removed on exit; the variables are set in this
    process only for the cluster's lifetime (Ray's processes inherit them at start)."""
    import ray

    folder = tempfile.mkdtemp(prefix="vwlmm-ray-")
    saved = {k: os.environ.get(k) for k in (*_FOREIGN_RAY_VARS, "RAY_AUTH_MODE",
                                              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    try:
        for name in _FOREIGN_RAY_VARS:
            os.environ.pop(name, None)
        os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                          RAY_AUTH_TOKEN_PATH=write_token_file(folder))
        ray.init(**init_kwargs)
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(folder, ignore_errors=True)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a service we started: SIGTERM to its PID, then SIGKILL to its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


class LocalRayHead:
    """``with LocalRayHead(ray_env()) as head:`` -> ``head.address``, ``head.dashboard`` and
    ``head.env``, the environment every client of this head must use (it carries the token)."""

    def __init__(self, env: Dict[str, str], num_cpus: int = 2, start_timeout: float = 120,
                 object_store_bytes: int = 300_000_000) -> None:
        # The head's private folder (0700, short: Ray's unix sockets live below it) holds the
        # token file and Ray's temp folder, which Ray itself makes world-writable.
        self.temp = tempfile.mkdtemp(prefix="vwr", dir="/tmp")
        self.token_path = write_token_file(self.temp)
        ray_temp = os.path.join(self.temp, "ray")
        self.env = {k: v for k, v in env.items() if k not in _FOREIGN_RAY_VARS}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path)
        gcs, dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        ports = dict(port=gcs, dashboard_port=dashboard)
        for name in ("ray_client_server_port", "node_manager_port", "object_manager_port",
                     "dashboard_agent_listen_port", "dashboard_agent_grpc_port",
                     "metrics_export_port", "runtime_env_agent_port"):
            ports[name] = free_port()
        workers = free_port_range(64, avoid=ports.values())
        cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
               "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={ray_temp}",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + 63}",
               f"--object-store-memory={object_store_bytes}"]
        cmd += [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
        self.log_path = Path(self.temp, "head.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait_until_answering(start_timeout)

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # answering (token auth may refuse anonymous calls)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    tail = self.log_path.read_text()[-2000:]
                    self.stop()
                    raise RuntimeError(f"ray head did not start: {tail}")
                time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)
        self._log.close()
        shutil.rmtree(self.temp, ignore_errors=True)

    def __enter__(self) -> "LocalRayHead":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

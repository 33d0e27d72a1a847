"""Private Ray clusters on 127.0.0.1 with token auth: a head for the demo and the tests, and the
local Ray that ``vwlmm-preprocess`` starts when it joins no cluster.

Ray silently replaces ``--node-ip-address=127.0.0.1`` with the machine's address; with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and ``RAY_AUTH_MODE=token`` exported (for the head and for
every client) it binds loopback only, with token auth. Token auth needs a token that Ray does not
create for ``ray start`` (and that ``ray.init`` would write to ``~/.ray/auth_token``, readable by
every later process of the user): each cluster started here gets its own random token, written
with mode 0600 into the cluster's private temp folder and handed to the head and every client as
``RAY_AUTH_TOKEN_PATH``. Nothing reads or writes ``~/.ray``. ``LocalRayHead`` sets these
variables itself, so it starts from any environment, a new user's empty one included.

Every port is chosen free and explicit so several heads (parallel test runs) never collide, and
the head is ``ray start --head --block`` under our own PID: stopping that PID stops exactly this
head, never another Ray on the machine (``ray stop`` would end them all).

The local Ray of a plain ``vwlmm-preprocess`` is such a head too, joined by its address: a bare
``ray.init()`` would instead join whatever cluster ``ray start`` last registered on the machine
(Ray's ``ray_current_cluster`` file), someone else's included.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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
def _loopback_token_client(env: Dict[str, str]) -> Iterator[None]:
    """This process as a client of a loopback, token-auth head whose environment is ``env``.

    Ray reads these settings when ``ray`` is imported (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    into ``ray._private.ray_constants``, ``RAY_AUTH_MODE`` into its cached config) and caches the
    token on first use, so setting the variables later is not enough: the flag and the config
    are reloaded as well (the config as Ray itself does when it turns token auth on), and all of
    it restored on exit. Variables that would point Ray at another cluster are hidden meanwhile."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    names = (*_FOREIGN_RAY_VARS, "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved = {k: os.environ.get(k) for k in names}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER

    def reload() -> None:
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    try:
        for name in names:
            os.environ.pop(name, None)
        os.environ.update({k: env[k] for k in names if k in env})
        ray_constants.ENABLE_RAY_CLUSTER = env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0"
        reload()
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        reload()


@contextlib.contextmanager
def private_local_ray(num_cpus: Optional[int] = None, **init_kwargs) -> Iterator["LocalRayHead"]:
    """A new single-machine Ray (a ``LocalRayHead`` with Ray's default object store) joined by
    this process with ``ray.init(address=...)``; ``init_kwargs`` go to that ``ray.init``."""
    import ray

    with LocalRayHead(dict(os.environ), num_cpus=num_cpus, object_store_bytes=None,
                      stop_with_parent=True) as head:
        with _loopback_token_client(head.env):
            try:
                ray.init(address=head.address, **init_kwargs)
                yield head
            finally:
                if ray.is_initialized():
                    ray.shutdown()


def _term_with_parent() -> None:
    """In a child before exec: SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


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

    def __init__(self, env: Dict[str, str], num_cpus: Optional[int] = 2,
                 start_timeout: float = 120,
                 object_store_bytes: Optional[int] = 300_000_000,
                 stop_with_parent: bool = False) -> None:
        """``num_cpus`` / ``object_store_bytes`` None: Ray's defaults (the machine's CPUs, a
        share of its memory). ``stop_with_parent``: the head gets SIGTERM when this process
        dies, even by SIGKILL (Linux), so a killed job never leaves its private Ray running."""
        # The head's private folder (0700, short: Ray's unix sockets live below it) holds the
        # token file and Ray's temp folder, which Ray itself makes world-writable.
        self.temp = tempfile.mkdtemp(prefix="vwr", dir="/tmp")
        self.token_path = write_token_file(self.temp)
        ray_temp = os.path.join(self.temp, "ray")
        self.env = {k: v for k, v in env.items() if k not in _FOREIGN_RAY_VARS}
        self.env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN_PATH=self.token_path)
        gcs, dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        ports = dict(port=gcs, dashboard_port=dashboard)
        for name in ("ray_client_server_port", "node_manager_port", "object_manager_port",
                     "dashboard_agent_listen_port", "dashboard_agent_grpc_port",
                     "metrics_export_port", "runtime_env_agent_port"):
            ports[name] = free_port()
        workers = free_port_range(64, avoid=ports.values())
        cmd = [str(BIN / "ray"), "start", "--head", "--block",
               "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={ray_temp}",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + 63}"]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        if object_store_bytes is not None:
            cmd.append(f"--object-store-memory={object_store_bytes}")
        cmd += [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
        self.log_path = Path(self.temp, "head.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=_term_with_parent if stop_with_parent else None)
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

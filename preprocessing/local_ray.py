"""A private Ray head on 127.0.0.1, for the demo and the tests.

Ray silently replaces ``--node-ip-address=127.0.0.1`` with the machine's address; with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and ``RAY_AUTH_MODE=token`` exported (for the head and for
every client) it binds loopback only, with token auth. Every port is chosen free and explicit so
several heads (parallel test runs) never collide, and the head is ``ray start --head --block``
under our own PID: stopping that PID stops exactly this head, never another Ray on the machine
(``ray stop`` would end them all).
"""

from __future__ import annotations

import os
import random
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
from typing import Dict, Optional

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1 (Ray's worker port range)."""
    for _ in range(50):
        base = random.randint(20000, 40000)
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


def ray_env(pythonpath: Optional[str] = None, **extra: str) -> Dict[str, str]:
    """The environment for a loopback Ray head and its clients (`ray job submit`, `ray.init`)."""
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               PATH=f"{BIN}:{env.get('PATH', '')}", **extra)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env.pop("RAY_ADDRESS", None)
    return env


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
    """``with LocalRayHead(env) as head:`` -> ``head.address``, ``head.dashboard``, ``head.env``."""

    def __init__(self, env: Dict[str, str], num_cpus: int = 2, start_timeout: float = 120,
                 object_store_bytes: int = 300_000_000) -> None:
        self.env = env
        self.temp = tempfile.mkdtemp(prefix="vwr", dir="/tmp")  # short: Ray's unix sockets
        gcs, dashboard, workers = free_port(), free_port(), free_port_range(64)
        self.address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        ports = dict(port=gcs, dashboard_port=dashboard)
        for name in ("ray_client_server_port", "node_manager_port", "object_manager_port",
                     "dashboard_agent_listen_port", "dashboard_agent_grpc_port",
                     "metrics_export_port", "runtime_env_agent_port"):
            ports[name] = free_port()
        cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
               "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={self.temp}",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + 63}",
               f"--object-store-memory={object_store_bytes}"]
        cmd += [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
        self.log_path = Path(self.temp, "head.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
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

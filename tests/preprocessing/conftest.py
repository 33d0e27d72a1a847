"""Shared fixtures: the converted Mistral tokenizer, the fixture dataset, one real Ray head and
one SeaweedFS S3 store per session (both on 127.0.0.1, free ports, stopped by PID)."""

from __future__ import annotations

import json
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

import pytest

from preprocessing.fixtures import write_demo_dataset
from preprocessing.tokenizer import build_mistral_hf_tokenizer

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_range(n: int) -> int:
    for _ in range(50):
        base = random.randint(20000, 40000)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def service_env() -> dict:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               PATH=f"{BIN}:{env.get('PATH', '')}", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    return env


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a service we started: its PID first, then its own process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    return str(build_mistral_hf_tokenizer(tmp_path_factory.mktemp("tok") / "mistral"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), variants=True, max_side=96)


@pytest.fixture(scope="session")
def ray_head():
    """`ray start --head --block` on 127.0.0.1; terminating that PID stops all its processes."""
    temp = tempfile.mkdtemp(prefix="vwr", dir="/tmp")  # short: Ray's unix sockets live here
    ports = {"gcs": free_port(), "dashboard": free_port()}
    workers = _port_range(64)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2",
           "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp}",
           f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}",
           f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
           f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--min-worker-port={workers}",
           f"--max-worker-port={workers + 63}", "--object-store-memory=300000000"]
    log = open(os.path.join(temp, "head.log"), "w")
    proc = subprocess.Popen(cmd, env=service_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering (token auth may refuse anonymous calls)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                _stop(proc)
                raise RuntimeError(f"ray head did not start: {Path(temp, 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"address": f"127.0.0.1:{ports['gcs']}", "dashboard": dashboard, "env": service_env()}
    _stop(proc)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """SeaweedFS `weed mini` S3 on free loopback ports with a fresh -dir (ARCHITECTURE §4)."""
    d = tmp_path_factory.mktemp("weed")
    for sub in ("data", "logs"):
        (d / sub).mkdir()
    creds = {"identities": [{"name": "t", "credentials": [{"accessKey": "K", "secretKey": "S"}],
                             "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    (d / "s3.json").write_text(json.dumps(creds))
    p = [free_port() for _ in range(5)]
    cmd = [str(BIN / "weed"), f"-logdir={d}/logs", "mini", f"-dir={d}/data", "-ip=127.0.0.1",
           "-ip.bind=127.0.0.1", f"-master.port={p[0]}", f"-volume.port={p[1]}",
           f"-filer.port={p[2]}", f"-s3.port={p[3]}", f"-admin.port={p[4]}",
           "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
           "-s3.port.lance=0", f"-filer.localSocket={d}/filer.sock", f"-s3.localSocket={d}/s3.sock",
           f"-s3.config={d}/s3.json", "-s3.allowDeleteBucketNotEmpty=false"]
    out = open(d / "weed.out", "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{p[3]}"
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="K", aws_secret_access_key="S",
                          config=Config(s3={"addressing_style": "path"}))
    deadline = time.time() + 60
    while True:
        try:
            client.create_bucket(Bucket="vwlmm-in")
            client.create_bucket(Bucket="vwlmm-out")
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                _stop(proc)
                raise RuntimeError(f"weed did not start: {(d / 'weed.out').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"endpoint": endpoint, "client": client,
           "env": {"AWS_ACCESS_KEY_ID": "K", "AWS_SECRET_ACCESS_KEY": "S", "AWS_REGION": "us-east-1"}}
    _stop(proc)
    out.close()


@pytest.fixture(scope="session")
def clean_run(ray_head, demo, tokenizer_dir, tmp_path_factory):
    """Reference: vicuna_v1 over the LLaVA fixtures, 2 workers, uninterrupted (read-only)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    from tests.preprocessing.pp_checks import llava_args, run_cli

    run_cli(ray_head, llava_args(demo, tokenizer_dir, "vicuna_v1", out) + ["--num-workers", "2"])
    return out

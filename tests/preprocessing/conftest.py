"""Shared fixtures: the converted Mistral tokenizer, the fixture dataset, one real Ray head and
one SeaweedFS S3 store per session (both on 127.0.0.1, free ports, stopped by PID).

S3 credentials reach Ray workers as they would on a real cluster: through the standard AWS chain
of the worker's own environment (here a shared credentials file named by the head's
``AWS_SHARED_CREDENTIALS_FILE``, written when the S3 store starts), never from the driver."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from preprocessing.fixtures import write_demo_dataset
from preprocessing.local_ray import LocalRayHead, free_port, ray_env, stop_process
from preprocessing.tokenizer import build_mistral_hf_tokenizer

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def service_env() -> dict:
    return ray_env(pythonpath=str(REPO))


def aws_credentials_file(tmp_path_factory) -> Path:
    """The session's shared credentials file (written by ``seaweed``; absent until then)."""
    return tmp_path_factory.getbasetemp() / "aws" / "credentials"


_stop = stop_process


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """The Mistral tokenizer as HF repositories ship it: tokenizer.json + tokenizer.model."""
    return str(build_mistral_hf_tokenizer(tmp_path_factory.mktemp("tok") / "mistral"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), variants=True, max_side=96)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One private Ray head on 127.0.0.1 for the session, stopped by its PID."""
    creds = aws_credentials_file(tmp_path_factory)
    env = {**service_env(), "AWS_SHARED_CREDENTIALS_FILE": str(creds)}
    with LocalRayHead(env, start_timeout=90) as head:
        yield {"address": head.address, "dashboard": head.dashboard, "env": head.env}


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """SeaweedFS `weed mini` S3 on free loopback ports with a fresh -dir."""
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
    creds = aws_credentials_file(tmp_path_factory)
    creds.parent.mkdir(exist_ok=True)
    creds.write_text("[default]\naws_access_key_id = K\naws_secret_access_key = S\n")
    creds.chmod(0o600)
    yield {"endpoint": endpoint, "client": client,
           "env": {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_REGION": "us-east-1"}}
    _stop(proc)
    out.close()


@pytest.fixture(scope="session")
def clean_run(ray_head, demo, tokenizer_dir, tmp_path_factory):
    """Reference: vicuna_v1 over the LLaVA fixtures, 2 workers, uninterrupted (read-only)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    from tests.preprocessing.pp_checks import llava_args, run_cli

    run_cli(ray_head, llava_args(demo, tokenizer_dir, "vicuna_v1", out) + ["--num-workers", "2"])
    return out

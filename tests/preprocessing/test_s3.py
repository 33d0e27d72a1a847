"""Input and output on a real S3 store (SeaweedFS on 127.0.0.1) through boto3: the storage
module itself, its error reporting, and whole preprocessing jobs whose Ray workers get their
credentials from their own environment (never from the driver)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from tests.preprocessing.pp_checks import check_output, laion_args, llava_args, run_cli
from preprocessing.tokenizer import load_tokenizer
from vwlmm_data import storage
from vwlmm_data.contract import load_manifest
from vwlmm_data.storage import S3Options


def _upload(client, root: Path, bucket: str) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, str(p.relative_to(root)))


def _download(client, bucket: str, prefix: str, dest: Path) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            target = dest / obj["Key"][len(prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))


@pytest.fixture
def fresh_clients():
    """Clients and filesystems built from the environment of this test only."""
    storage.client.cache_clear()
    storage._arrow_filesystem.cache_clear()
    yield
    storage.client.cache_clear()
    storage._arrow_filesystem.cache_clear()


def test_storage_round_trip_on_s3(seaweed, monkeypatch, fresh_clients):
    for k, v in seaweed["env"].items():
        monkeypatch.setenv(k, v)
    s3 = S3Options(endpoint_url=seaweed["endpoint"])
    root = "s3://vwlmm-out/storage"
    for name in ("a/1.tar", "a/2.tar", "a/x.json"):
        storage.write_bytes(f"{root}/{name}", b"0123456789", s3)
    assert storage.read_bytes(f"{root}/a/1.tar", s3, 3, 7) == b"3456"
    assert storage.expand(f"{root}/a/*.tar", s3) == [f"{root}/a/1.tar", f"{root}/a/2.tar"]
    assert storage.exists(f"{root}/a/x.json", s3) and not storage.exists(f"{root}/a/3.tar", s3)
    with pytest.raises(FileNotFoundError, match="a/3.tar: no such object"):
        storage.read_bytes(f"{root}/a/3.tar", s3)
    with pytest.raises(RuntimeError), storage.StagedFile(f"{root}/a/4.tar", s3) as staged:
        staged.file.write(b"partial")
        raise RuntimeError("worker died")
    assert not storage.exists(f"{root}/a/4.tar", s3)  # an aborted upload never appears
    # Arrow random access through pyarrow, the endpoint resolved by boto3 from the standard
    # environment variable when the options leave it unset.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, pa.schema([("x", pa.int32())])) as w:
        w.write_table(pa.table({"x": pa.array([7, 8], pa.int32())}))
    storage.write_bytes(f"{root}/t.arrow", sink.getvalue().to_pybytes(), s3)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", seaweed["endpoint"])
    table = pa.ipc.open_file(storage.open_random_access(f"{root}/t.arrow")).read_all()
    assert table.column("x").to_pylist() == [7, 8]
    storage.remove_files(list(storage.list_prefix(root, s3)), s3)
    assert list(storage.list_prefix(root, s3)) == []


def test_s3_errors_other_than_missing_are_not_reported_as_missing(seaweed, tmp_path, monkeypatch,
                                                                   fresh_clients):
    from botocore.exceptions import ClientError

    s3 = S3Options(endpoint_url=seaweed["endpoint"])
    uri = "s3://vwlmm-out/errors/manifest.json"
    seaweed["client"].put_object(Bucket="vwlmm-out", Key="errors/manifest.json", Body=b"{}")
    wrong = tmp_path / "credentials"
    wrong.write_text("[default]\naws_access_key_id = K\naws_secret_access_key = not-S\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(wrong))
    for read in (lambda: storage.exists(uri, s3), lambda: storage.read_bytes(uri, s3),
                 lambda: load_manifest("s3://vwlmm-out/errors", s3)):
        with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied|Forbidden"):
            read()
    with pytest.raises(OSError, match="(?i)access|forbidden|signature") as info:
        storage.open_random_access(uri, s3)
    assert not isinstance(info.value, FileNotFoundError)


def test_the_driver_puts_no_credential_into_rays_runtime_env(monkeypatch):
    """Ray shows a task's runtime_env in its logs, State API and dashboard."""
    from preprocessing.runner import task_options
    from tests import faults

    secrets = {"AWS_ACCESS_KEY_ID": "AKIA-SENTINEL-ID", "AWS_SECRET_ACCESS_KEY": "SENTINEL-SECRET",
               "AWS_SESSION_TOKEN": "SENTINEL-SESSION", "AWS_SECURITY_TOKEN": "SENTINEL-SECURITY"}
    for k, v in {**secrets, **faults.env("crash_unit_once=3:/tmp/marker")}.items():
        monkeypatch.setenv(k, v)
    options = json.dumps(task_options())
    assert "3:/tmp/marker" in options  # the test hook still reaches the workers
    assert not [v for v in secrets.values() if v in options]
    assert "AWS_" not in options


@pytest.fixture(scope="module")
def s3_inputs(seaweed, demo):
    _upload(seaweed["client"], demo.root, "vwlmm-in")
    return seaweed


def test_llava_s3_in_s3_out(ray_head, demo, tokenizer_dir, s3_inputs, clean_run, tmp_path, monkeypatch):
    s3 = s3_inputs
    args = llava_args(demo, tokenizer_dir, "vicuna_v1", "s3://vwlmm-out/llava",
                      inputs=["s3://vwlmm-in/llava_*.json"], image_root="s3://vwlmm-in/llava_images")
    run_cli(ray_head, args + ["--s3-endpoint", s3["endpoint"]], env=s3["env"])
    local = tmp_path / "llava"
    _download(s3["client"], "vwlmm-out", "llava", local)
    tok = load_tokenizer(tokenizer_dir)
    check_output(str(local), demo.llava_expected, tok)
    # The shards are byte-identical to the local-files run of the same job.
    ref = load_manifest(str(clean_run))
    for shard in ref.shards:
        assert (local / shard.path).read_bytes() == (clean_run / shard.path).read_bytes()
    # The trainer's entry point reads the manifest straight from S3 (boto3's standard env).
    for k, v in {**s3["env"], "AWS_ENDPOINT_URL": s3["endpoint"]}.items():
        monkeypatch.setenv(k, v)
    m = load_manifest("s3://vwlmm-out/llava")
    assert (m.num_samples, m.rejected, m.shards) == (ref.num_samples, ref.rejected, ref.shards)


def test_laion_tars_range_read_from_s3(ray_head, demo, tokenizer_dir, s3_inputs, tmp_path):
    s3 = s3_inputs
    inputs = ["s3://vwlmm-in/laion/*.tar", "s3://vwlmm-in/laion/*.parquet"]
    args = laion_args(demo, tokenizer_dir, "s3://vwlmm-out/laion", inputs=inputs, fmt="webdataset")
    run_cli(ray_head, args + ["--s3-endpoint", s3["endpoint"]], env=s3["env"])
    local = tmp_path / "laion"
    _download(s3["client"], "vwlmm-out", "laion", local)
    check_output(str(local), demo.laion_expected, load_tokenizer(tokenizer_dir))

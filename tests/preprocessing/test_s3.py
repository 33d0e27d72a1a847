"""Input and output on a real S3 store (SeaweedFS on 127.0.0.1) through boto3."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.preprocessing.pp_checks import check_output, laion_args, llava_args, run_cli
from preprocessing.schema import load_manifest
from preprocessing.tokenizer import load_tokenizer


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
    # The trainer's entry point reads the manifest straight from S3 (standard AWS env).
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

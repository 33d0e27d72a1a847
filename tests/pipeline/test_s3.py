"""Both shard formats read from s3:// (SeaweedFS on 127.0.0.1) equal the local read."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.loader import LoaderSpec, RankData
from pipeline.data.synthetic import make_samples, write_dataset
from pipeline.validate import load_manifest, select_shards
from tests.pipeline.test_data import first_image, keys
from vwlmm_data.storage import S3Options


@pytest.mark.parametrize("fmt", ["webdataset", "arrow"])
def test_s3_reads_equal_local_reads(seaweed, tmp_path, monkeypatch, fmt):
    for k, v in seaweed["env"].items():
        monkeypatch.setenv(k, v)
    local = Path(write_dataset(str(tmp_path / "d"), make_samples(12, seed=4), shard_size=4))
    prefix = f"pipeline-{fmt}"
    for path in local.rglob("*"):
        if path.is_file():
            seaweed["client"].upload_file(str(path), "vwlmm-in",
                                          f"{prefix}/{path.relative_to(local)}")
    root = f"s3://vwlmm-in/{prefix}"
    s3 = S3Options(endpoint_url=seaweed["endpoint"])

    def read(root_url, opts):
        manifest = load_manifest(root_url, opts)
        spec = LoaderSpec(shards=tuple(select_shards(manifest, root_url, fmt)), format=fmt,
                          micro_batch_size=2, global_batch_size=4, dp_size=1, dp_rank=0, seed=3,
                          seq_length=64, num_patches=16, image_size=32, pad_token_id=0,
                          vision=manifest.vision, num_workers=1, s3=opts, collate_fn=first_image)
        return keys(RankData(spec).train_iterator(4), 8)  # resumed mid-epoch, into epoch 2

    assert read(root, s3) == read(str(local), S3Options())

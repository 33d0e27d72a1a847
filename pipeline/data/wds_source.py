"""Stream WebDataset shards (local or s3://) with webdataset's tar expansion and key grouping."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, Dict, Iterator

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.data.decode import BadSampleError
from vwlmm_data.contract import ShardInfo
from vwlmm_data.storage import S3Options, open_read


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise BadSampleError(f"{where}: not a numpy .npy array ({exc})") from exc


def to_raw(sample: Dict[str, Any], url: str) -> Dict[str, Any]:
    """webdataset member dict -> the format-independent raw sample of the data contract."""
    key = sample["__key__"]
    where = f"sample {key!r} in {url}"
    for member in ("json", "input_ids.npy", "labels.npy"):
        if member not in sample:
            raise BadSampleError(f"{where}: member {key}.{member} is missing")
    meta = json.loads(sample["json"])
    n = int(meta.get("num_images", 0))
    images = []
    for i in range(n):
        if f"img{i}.jpg" not in sample:
            raise BadSampleError(f"{where}: num_images={n} but {key}.img{i}.jpg is missing")
        images.append(sample[f"img{i}.jpg"])
    return {
        "key": key,
        "input_ids": _load_npy(sample["input_ids.npy"], where),
        "labels": _load_npy(sample["labels.npy"], where),
        "images": images,
        "num_images": n,
    }


def iter_shard(shard: ShardInfo, s3: S3Options = S3Options()) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard in stored order; checks the count against the manifest."""
    stream = open_read(shard.path, s3)
    count = 0
    try:
        files = tar_file_expander([{"url": shard.path, "stream": stream}])
        for sample in group_by_keys(files):
            count += 1
            yield to_raw(sample, shard.path)
    finally:
        stream.close()
    if count != shard.num_samples:
        raise ValueError(f"{shard.path}: holds {count} samples but manifest.json says "
                         f"{shard.num_samples}")

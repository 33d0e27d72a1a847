"""Stream WebDataset shards (local or s3://) with webdataset's tar expansion and key grouping."""

from __future__ import annotations

from typing import Any, Dict, Iterator

from webdataset.tariterators import group_by_keys, tar_file_expander

from vwlmm_data.contract import ShardInfo
from vwlmm_data.samples import from_members
from vwlmm_data.storage import S3Options, open_read


def to_raw(members: Dict[str, Any], url: str) -> Dict[str, Any]:
    """webdataset member dict -> the format-independent raw sample of the data contract."""
    sample = from_members(members, url)
    return {"key": sample.key, "input_ids": sample.input_ids, "labels": sample.labels,
            "images": sample.images, "num_images": sample.num_images}


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

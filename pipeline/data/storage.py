"""Open dataset files on local disk or ``s3://`` with one interface.

WebDataset shards are read as forward-only streams (boto3 ``get_object`` bodies: no temp files);
Arrow shards need random access, which pyarrow's S3 filesystem gives through range requests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Optional, Tuple
from urllib.parse import urlparse


@dataclass(frozen=True)
class S3Options:
    """Endpoint for S3-compatible stores (MinIO, SeaweedFS); None = AWS default chain."""

    endpoint_url: Optional[str] = None
    region: str = "us-east-1"


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if is_s3(root) else os.path.join(root, rel)


def _split_s3(url: str) -> Tuple[str, str]:
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.lstrip("/")


def _boto_client(opts: S3Options):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=opts.endpoint_url, region_name=opts.region,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}))


def open_stream(url: str, opts: S3Options = S3Options()) -> BinaryIO:
    """A readable binary stream over ``url`` (forward-only for s3)."""
    if not is_s3(url):
        return open(url, "rb")
    bucket, key = _split_s3(url)
    try:
        return _boto_client(opts).get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:
        raise FileNotFoundError(f"{url}: cannot open ({exc})") from exc


def read_bytes(url: str, opts: S3Options = S3Options()) -> bytes:
    with open_stream(url, opts) as f:
        return f.read()


def open_random_access(url: str, opts: S3Options = S3Options()):
    """A pyarrow RandomAccessFile (memory-mapped when local) for Arrow IPC shards."""
    import pyarrow as pa
    from pyarrow import fs

    if not is_s3(url):
        return pa.memory_map(url, "r")
    bucket, key = _split_s3(url)
    kwargs = {"region": opts.region}
    if opts.endpoint_url:
        parsed = urlparse(opts.endpoint_url)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return fs.S3FileSystem(**kwargs).open_input_file(f"{bucket}/{key}")

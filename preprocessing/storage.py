"""Local paths and ``s3://`` URIs behind one small interface (boto3 for S3).

Why not fsspec: boto3 is the library our users configure already (standard AWS env / config
files), and we need exactly five operations with S3 semantics we control: ranged reads,
listing, and atomic writes (an object only appears when its upload, multipart or not, completes).
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import os
import re
import shutil
import tempfile
from typing import BinaryIO, Iterator

_S3_ENDPOINT: str | None = None
_WILDCARD = re.compile(r"[*?\[]")


def configure(s3_endpoint: str | None) -> None:
    """Select an S3-compatible endpoint (``--s3-endpoint``); None keeps boto3's own resolution."""
    global _S3_ENDPOINT
    if s3_endpoint != _S3_ENDPOINT:
        _S3_ENDPOINT = s3_endpoint
        _client.cache_clear()


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: S3 URI has no bucket")
    return bucket, key


@functools.lru_cache(maxsize=None)
def _client():
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # Path-style addressing works with AWS and with every S3-compatible store (SeaweedFS, MinIO).
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.client("s3", endpoint_url=_S3_ENDPOINT, region_name=region, config=cfg)


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return os.path.exists(uri)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        _client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    """Whole object, or bytes ``[start, end)``. Missing objects raise FileNotFoundError."""
    with open_read(uri, start, end) as f:
        return f.read()


class _Limited:
    """File-like view of at most ``n`` bytes of an underlying stream (for ranged local reads)."""

    def __init__(self, f: BinaryIO, n: int | None):
        self._f, self._left = f, n

    def read(self, size: int = -1) -> bytes:
        if self._left is None:
            return self._f.read(size)
        if size < 0 or size > self._left:
            size = self._left
        data = self._f.read(size)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_read(uri: str, start: int | None = None, end: int | None = None) -> _Limited:
    """A streaming reader (bounded memory) over a whole object or the byte range ``[start, end)``."""
    if not is_s3(uri):
        f = open(uri, "rb")
        if start:
            f.seek(start)
        return _Limited(f, None if end is None else end - (start or 0))
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    kwargs = {}
    if start is not None or end is not None:
        kwargs["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
    try:
        body = _client().get_object(Bucket=bucket, Key=key, **kwargs)["Body"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(uri) from exc
        raise
    return _Limited(body, None)


def expand(pattern: str) -> list[str]:
    """Expand a path, glob or S3 URI (globs allowed in the key) into a sorted list of files."""
    if not is_s3(pattern):
        if _WILDCARD.search(pattern):
            return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        return [pattern]
    if not _WILDCARD.search(pattern):
        return [pattern]
    bucket, key = split_s3(pattern)
    prefix = key[: _WILDCARD.search(key).start()]
    out = []
    for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if fnmatch.fnmatchcase(obj["Key"], key):
                out.append(f"s3://{bucket}/{obj['Key']}")
    return sorted(out)


def list_prefix(uri: str) -> Iterator[str]:
    """Every file below a folder / prefix (used by tests and cleanup)."""
    if not is_s3(uri):
        for root, _, files in os.walk(uri):
            for name in files:
                yield os.path.join(root, name)
        return
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield f"s3://{bucket}/{obj['Key']}"


def local_tmp_dir(target: str) -> str:
    """Where to stage a file for ``target``: beside it when local (same filesystem for rename)."""
    if is_s3(target):
        return tempfile.gettempdir()
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    return parent


def commit_file(local_path: str, target: str) -> None:
    """Publish a finished local file at ``target`` atomically.

    Local: ``os.replace`` (atomic rename on one filesystem). S3: boto3's managed upload, which uses
    multipart for big files; the object becomes visible only when the upload completes, so
    readers and resumed runs never see half a shard.
    """
    if is_s3(target):
        bucket, key = split_s3(target)
        try:
            _client().upload_file(local_path, bucket, key)
        finally:
            os.unlink(local_path)
        return
    os.replace(local_path, target)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic small write (temp file + commit)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=local_tmp_dir(uri))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    commit_file(tmp, uri)


def remove_tree(uri: str) -> None:
    """Delete a folder / prefix (``--overwrite``)."""
    if not is_s3(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    bucket, _ = split_s3(uri)
    for obj in list(list_prefix(uri)):
        _client().delete_object(Bucket=bucket, Key=split_s3(obj)[1])

"""Local paths and ``s3://`` URIs behind one set of functions, for preprocessing and training.

S3 goes through boto3 (and pyarrow's S3 filesystem for random access into Arrow shards) with the
standard AWS configuration: credentials from the usual chain (environment, shared credentials
file, instance role), never from this code. What a job chooses explicitly is an ``S3Options``
(endpoint and region, no secrets), passed to every call; left at ``None`` each falls back to
boto3's own resolution, which honours ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and
``AWS_REGION``. One boto3 client is built per distinct options and reused.

Errors keep their meaning: a missing object is ``FileNotFoundError``; anything else S3 says
(access denied, expired credentials, no such bucket) propagates as boto3 raised it, message
included, so a permission problem is never reported as missing data.

Writes are atomic and durable: the bytes go to a temp file (beside the target when local, so
``os.replace`` stays on one filesystem), which is fsynced, then renamed over the target, then
the folder is fsynced; on S3 the managed upload makes the object appear only once complete.
Temp files carry a name only this module makes (``STAGING_PREFIX`` + 8 random characters +
``.partial``), so cleaning up after a killed writer never touches a user's own ``.tmp-*`` files.

Deletes are of listed files only (``remove_files``); ``protected_reason`` names the locations
no job may clear as a whole: a filesystem root, a top-level folder (``/tmp``, ``/data``), the
home folder or one of its ancestors, a bucket root (``s3://bucket``).
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator
from urllib.parse import urlparse

_WILDCARD = re.compile(r"[*?\[]")
STAGING_PREFIX = ".vwlmm-staging-"
STAGING_SUFFIX = ".partial"
# tempfile.mkstemp's random part: 8 characters from [a-z0-9_].
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[a-z0-9_]{8}" + re.escape(STAGING_SUFFIX)
                           + "$")
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


@dataclass(frozen=True)
class S3Options:
    """Where S3 is: ``endpoint_url`` for S3-compatible stores (MinIO, SeaweedFS), ``region``.

    ``None`` keeps boto3's resolution (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
    ``AWS_REGION``, the config file). Credentials are never options: they come from the
    standard chain on whichever machine does the reading.
    """

    endpoint_url: str | None = None
    region: str | None = None


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r}: S3 URI has no bucket")
    return bucket, key


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


@functools.lru_cache(maxsize=None)
def client(s3: S3Options):
    """The boto3 S3 client of ``s3`` (one per distinct options, per process).

    Built from its own boto3 session rather than boto3's process-wide default one, so the
    client resolves the credential chain itself when first built, and nothing else shares it.
    """
    import boto3
    from botocore.config import Config

    # Path-style addressing works with AWS and with every S3-compatible store.
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=s3.endpoint_url,
                                          region_name=s3.region, config=cfg)


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and \
        exc.response.get("Error", {}).get("Code") in _NOT_FOUND


def exists(uri: str, s3: S3Options = S3Options()) -> bool:
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = split_s3(uri)
    try:
        client(s3).head_object(Bucket=bucket, Key=key)
        return True
    except Exception as exc:
        if _is_not_found(exc):
            return False
        raise


class _Limited:
    """File-like view of at most ``n`` bytes of an underlying stream (ranged local reads)."""

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


def open_read(uri: str, s3: S3Options = S3Options(), start: int | None = None,
              end: int | None = None) -> _Limited:
    """A forward-only reader (bounded memory) over a whole file or its bytes ``[start, end)``.

    A missing file raises ``FileNotFoundError``; other S3 errors propagate unchanged.
    """
    if not is_s3(uri):
        f = open(uri, "rb")
        if start:
            f.seek(start)
        return _Limited(f, None if end is None else end - (start or 0))
    bucket, key = split_s3(uri)
    kwargs = {}
    if start is not None or end is not None:
        kwargs["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
    try:
        body = client(s3).get_object(Bucket=bucket, Key=key, **kwargs)["Body"]
    except Exception as exc:
        if _is_not_found(exc):
            raise FileNotFoundError(f"{uri}: no such object") from exc
        raise
    return _Limited(body, None)


def read_bytes(uri: str, s3: S3Options = S3Options(), start: int | None = None,
               end: int | None = None) -> bytes:
    """The whole file, or its bytes ``[start, end)``."""
    with open_read(uri, s3, start, end) as f:
        return f.read()


class FileTooLarge(OSError):
    """A file over the size limit a reader set (it was not read whole)."""


class NotRegularFile(OSError):
    """A FIFO, device, socket or folder where a regular file was expected."""


def read_limited(uri: str, limit: int, s3: S3Options = S3Options()) -> bytes:
    """The whole file if it is a regular file of at most ``limit`` bytes.

    Never blocks and never reads more than ``limit + 1`` bytes: a FIFO, a device (``/dev/zero``)
    or a socket is ``NotRegularFile`` (opened non-blocking, checked with ``fstat`` before any
    read), a bigger file ``FileTooLarge``. Other failures are the ``OSError`` the system gave
    (``FileNotFoundError``, ``NotADirectoryError``, name too long, ...).
    """
    if is_s3(uri):
        data = read_bytes(uri, s3, 0, limit + 1)
    else:
        fd = os.open(uri, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFile(f"{uri} is not a regular file")
            if st.st_size > limit:
                raise FileTooLarge(f"{uri} has {st.st_size} bytes, more than the limit of {limit}")
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"{uri} has more than the limit of {limit} bytes")
    return data


@functools.lru_cache(maxsize=None)
def _arrow_filesystem(s3: S3Options):
    """pyarrow's S3 filesystem at the endpoint and region boto3 resolves for ``s3``, so both
    libraries read the same store (pyarrow does not read ``AWS_ENDPOINT_URL*`` itself).
    Credentials: the AWS SDK's own standard chain, as boto3's."""
    from pyarrow import fs

    meta = client(s3).meta
    endpoint = urlparse(meta.endpoint_url)
    return fs.S3FileSystem(region=meta.region_name, endpoint_override=endpoint.netloc,
                           scheme=endpoint.scheme or "https")


def open_random_access(uri: str, s3: S3Options = S3Options()):
    """A pyarrow ``RandomAccessFile`` (memory-mapped when local, range requests on S3)."""
    import pyarrow as pa

    if not is_s3(uri):
        return pa.memory_map(uri, "r")
    bucket, key = split_s3(uri)
    try:
        return _arrow_filesystem(s3).open_input_file(f"{bucket}/{key}")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: no such object") from exc


def expand(pattern: str, s3: S3Options = S3Options()) -> list[str]:
    """A path, glob or S3 URI (globs allowed in the key) -> the sorted list of files it names."""
    if not _WILDCARD.search(pattern):
        return [pattern]
    if not is_s3(pattern):
        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    return [f.uri for f in _s3_glob(pattern, s3)]


def s3_pattern_names(pattern: str, uri: str) -> bool:
    """Whether ``expand(pattern)`` would list the S3 object ``uri`` (if it exists), decided
    without a request: the same wildcard match on the key as ``expand``."""
    if not (is_s3(pattern) and is_s3(uri)):
        return False
    if not _WILDCARD.search(pattern):
        return pattern == uri
    (bucket, key), (ubucket, ukey) = split_s3(pattern), split_s3(uri)
    return bucket == ubucket and fnmatch.fnmatchcase(ukey, key)


@dataclass(frozen=True)
class FileInfo:
    """A file as storage describes it: what a rerun compares to notice that an input changed."""

    uri: str
    size: int
    version: str  # local: st_mtime_ns; S3: the ETag


def expand_info(pattern: str, s3: S3Options = S3Options()) -> list[FileInfo]:
    """``expand`` with each file's size and version: local files from ``os.stat``, S3 globs from
    the listing itself (no request per object), an S3 key without wildcards from a HEAD.
    A file named without wildcards that does not exist raises ``FileNotFoundError``."""
    if not is_s3(pattern):
        out = []
        for path in expand(pattern):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"input {path} does not exist") from None
            out.append(FileInfo(path, st.st_size, str(st.st_mtime_ns)))
        return out
    if _WILDCARD.search(pattern):
        return _s3_glob(pattern, s3)
    bucket, key = split_s3(pattern)
    try:
        head = client(s3).head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if _is_not_found(exc):
            raise FileNotFoundError(f"input {pattern} does not exist") from exc
        raise
    return [FileInfo(pattern, head["ContentLength"], head["ETag"])]


def _s3_glob(pattern: str, s3: S3Options) -> list[FileInfo]:
    """The objects whose key matches the wildcards of ``pattern``, sorted by URI."""
    bucket, key = split_s3(pattern)
    prefix = key[: _WILDCARD.search(key).start()]
    return sorted((f for f in _list_objects(bucket, prefix, s3)
                   if fnmatch.fnmatchcase(split_s3(f.uri)[1], key)), key=lambda f: f.uri)


def _list_objects(bucket: str, prefix: str, s3: S3Options) -> Iterator[FileInfo]:
    pages = client(s3).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            yield FileInfo(f"s3://{bucket}/{obj['Key']}", obj["Size"], obj["ETag"])


def list_prefix(uri: str, s3: S3Options = S3Options()) -> Iterator[str]:
    """Every file below a folder / prefix."""
    if not is_s3(uri):
        for root, _, files in os.walk(uri):
            for name in files:
                yield os.path.join(root, name)
        return
    bucket, key = split_s3(uri)
    yield from (f.uri for f in _list_objects(bucket, key.rstrip("/") + "/" if key else "", s3))


def is_staging_name(name: str) -> bool:
    """Whether a file name is one of ``StagedFile``'s temp files (and nothing else's)."""
    return _STAGING_NAME.match(name) is not None


def _makedirs_durable(folder: str) -> None:
    """``os.makedirs`` that also fsyncs the parent of each folder it creates, so the folder
    entries (and the files later committed in them) survive a crash of the machine."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # created meanwhile by another writer
            continue
        fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    """Make the folder's entries (creations, renames, deletions) durable: on POSIX a directory
    entry lives in the folder, not in the file."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """This process's umask, read without changing it where the OS allows (Linux's
    ``/proc/self/status``; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode ``os.mkdir()`` gives a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


class StagedFile:
    """A local temp file (``.file``, binary) that becomes ``target`` on ``commit()`` or
    disappears on ``abort()``; readers never see a partial ``target``.

    Local targets stage beside the target (``is_staging_name`` names, same filesystem), S3
    targets in the machine's temp folder. As a context manager: commit on success, abort on
    an exception.
    """

    def __init__(self, target: str, s3: S3Options = S3Options()):
        self.target, self.s3 = target, s3
        if is_s3(target):
            folder = tempfile.gettempdir()
        else:
            folder = os.path.dirname(os.path.abspath(target))
            _makedirs_durable(folder)
        fd, self.tmp = tempfile.mkstemp(prefix=STAGING_PREFIX, suffix=STAGING_SUFFIX, dir=folder)
        # mkstemp creates 0600; the published file gets the mode open() would give it (0644
        # under umask 022), so other accounts (a training job, a colleague) can read the data.
        os.fchmod(fd, default_file_mode())
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if is_s3(self.target):
            # boto3's managed upload (multipart when large): the object appears only complete.
            bucket, key = split_s3(self.target)
            try:
                client(self.s3).upload_file(self.tmp, bucket, key)
            finally:
                os.unlink(self.tmp)
            return
        os.replace(self.tmp, self.target)
        fsync_dir(os.path.dirname(os.path.abspath(self.target)))

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> "StagedFile":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_bytes(uri: str, data: bytes, s3: S3Options = S3Options()) -> None:
    """Atomic, durable write of a whole file."""
    with StagedFile(uri, s3) as staged:
        staged.file.write(data)


def protected_reason(uri: str) -> str | None:
    """Why no job may delete ``uri`` as a whole (None: it may).

    A bucket root, a filesystem root, a top-level folder, the home folder or an ancestor of it.
    """
    if is_s3(uri):
        _, key = split_s3(uri)
        return "it is a bucket root" if not key.strip("/") else None
    path = os.path.realpath(os.path.expanduser(uri))
    if os.path.dirname(path) == path:
        return "it is a filesystem root"
    if os.path.dirname(os.path.dirname(path)) == os.path.dirname(path):
        return "it is a top-level folder"
    home = os.path.realpath(os.path.expanduser("~"))
    if path == home or home.startswith(path.rstrip(os.sep) + os.sep):
        return "it is the home folder or one of its ancestors"
    return None


def remove_files(uris: list[str], s3: S3Options = S3Options()) -> None:
    """Delete the listed files / objects (missing ones are no error)."""
    local = [u for u in uris if not is_s3(u)]
    for path in local:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):  # the DeleteObjects limit per request
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            resp = client(s3).delete_objects(Bucket=bucket,
                                             Delete={"Objects": batch, "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise OSError(f"could not delete {len(resp['Errors'])} object(s), e.g. "
                              f"s3://{bucket}/{first.get('Key')}: {first.get('Message')}")

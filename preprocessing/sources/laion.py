"""LAION-style input: img2dataset WebDataset tars (``.jpg``/``.txt``/``.json``) joined by key with
parquet metadata (url/caption, optional punsafe, pwatermark, similarity, width, height).

Pairing follows img2dataset's layout: ``00000.tar`` joins ``00000.parquet`` when that parquet is
among the inputs; without one, the tar's own ``.json``/``.txt`` members are the metadata.
Units are byte ranges of a tar (recorded by the scan), so a worker range-reads only its part.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Iterator

import pyarrow.parquet as pq

from preprocessing import storage
from preprocessing.sources import RawRecord, content_digest, make_key
from preprocessing.templates import IMAGE_TAG, Turn

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BLOCK = 512


def pair_inputs(files: list[str]) -> list[tuple[str, str | None]]:
    """(tar, parquet or None) pairs in input order; a parquet without its tar is an error."""
    tars = [f for f in files if f.endswith(".tar")]
    parquets = {os.path.splitext(f)[0]: f for f in files if f.endswith(".parquet")}
    other = [f for f in files if not f.endswith((".tar", ".parquet"))]
    if other:
        raise ValueError(f"--source laion takes .tar and .parquet inputs, got {other[:3]}")
    stems = {os.path.splitext(t)[0] for t in tars}
    orphans = sorted(p for s, p in parquets.items() if s not in stems)
    if orphans:
        raise ValueError(f"parquet metadata without a matching img2dataset tar: {orphans[:3]}")
    if not tars:
        raise ValueError("--source laion found no .tar inputs")
    return [(t, parquets.get(os.path.splitext(t)[0])) for t in tars]


def _split_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    dirname = os.path.dirname(name)
    stem, _, ext = base.partition(".")
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


def _iter_samples(stream) -> Iterator[tuple[str, dict[str, bytes], int, int]]:
    """Group consecutive tar members by key: (key, {ext: bytes}, start offset, end offset)."""
    cur_key, cur, start, end = None, {}, 0, 0
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = _split_name(m.name)
            data = tf.extractfile(m).read()
            if key != cur_key:
                if cur_key is not None:
                    yield cur_key, cur, start, end
                cur_key, cur, start = key, {}, m.offset
            cur[ext] = data
            end = m.offset_data + -(-m.size // _BLOCK) * _BLOCK
    if cur_key is not None:
        yield cur_key, cur, start, end


def _caption(members: dict[str, bytes], meta: dict) -> str | None:
    for col in ("caption", "TEXT", "text"):
        if isinstance(meta.get(col), str):
            return meta[col]
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace")
    return None


def _image(members: dict[str, bytes]) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in members:
            return members[ext]
    return None


def scan(tar_uri: str) -> list[dict]:
    """Per sample: key, byte range and dedup digest (image bytes + tar caption)."""
    out = []
    try:
        with storage.open_read(tar_uri) as f:
            for key, members, start, end in _iter_samples(f):
                image = _image(members)
                meta = _tar_meta(members)
                text = _caption(members, meta) or ""
                out.append({
                    "key": make_key("laion", _source_id(key, meta)),
                    "start": start,
                    "end": end,
                    "digest": content_digest([image], text) if image is not None else None,
                })
    except tarfile.TarError as exc:
        # A broken container (not a broken image) cannot be split into samples: stop the job
        # with the file's name rather than silently dropping the rest of the shard.
        raise ValueError(f"{tar_uri}: unreadable tar after {len(out)} samples: {exc}") from exc
    return out


def _tar_meta(members: dict[str, bytes]) -> dict:
    if "json" not in members:
        return {}
    try:
        meta = json.loads(members["json"])
        return meta if isinstance(meta, dict) else {}
    except ValueError:
        return {}


def _source_id(tar_key: str, meta: dict) -> str:
    return str(meta.get("key") or os.path.basename(tar_key))


def _load_parquet(uri: str) -> dict[str, dict]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    if "key" not in table.column_names:
        raise ValueError(f"{uri}: parquet has no 'key' column to join img2dataset tars on")
    rows = table.to_pylist()
    return {str(r["key"]): r for r in rows}


def read_unit(tar_uri: str, parquet_uri: str | None, start: int, end: int) -> Iterator[RawRecord]:
    """The records of bytes ``[start, end)`` of one tar, joined with its parquet row."""
    table = _load_parquet(parquet_uri) if parquet_uri else None
    with storage.open_read(tar_uri, start, end) as f:
        for key, members, _, _ in _iter_samples(f):
            meta = _tar_meta(members)
            sid = _source_id(key, meta)
            rec = RawRecord(key=make_key("laion", sid), source_id=sid)
            if table is not None:
                row = table.get(sid)
                if row is None:
                    rec.error = ("metadata_missing", f"key {sid!r} not in {parquet_uri}")
                    yield rec
                    continue
                meta.update({k: v for k, v in row.items() if v is not None})
            rec.meta = {k: meta[k] for k in sorted(meta)}
            caption = _caption(members, meta)
            image = _image(members)
            if image is None:
                rec.error = ("image_missing", f"tar sample {key!r} has no image member")
            elif caption is None:
                rec.error = ("missing_caption", f"tar sample {key!r} has no caption")
            else:
                rec.images = [image]
                rec.turns = [Turn("human", IMAGE_TAG), Turn("gpt", caption)]
            yield rec

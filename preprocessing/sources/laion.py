"""LAION-style input: img2dataset WebDataset tars (``.jpg``/``.txt``/``.json``) joined by key with
parquet metadata (url/caption, optional punsafe, pwatermark, similarity, width, height).

Pairing follows img2dataset's layout: ``00000.tar`` joins ``00000.parquet`` when that parquet is
among the inputs; without one, the tar's own ``.json``/``.txt`` members are the metadata.
Units are byte ranges of a tar (recorded by the scan), so a worker range-reads only its part.
The source's own filters (``LaionOptions``: metadata scores, caption length) are its flags and
manifest fields (``preprocessing/sources/options.py``).

Hostile records are rejects, never crashes: a member over ``max_image_bytes`` is skipped unread
("file_too_large"), metadata or a caption with a lone UTF-16 surrogate is "bad_text", and
``.json`` members that do not parse (or nest too deeply) are ignored as metadata, as before.
What cannot be read as records at all is an error naming the file: a broken tar at scan time,
and a parquet whose footer or schema does not read before anything is planned
(``LaionSource.input_files``).
"""

from __future__ import annotations

import io
import json
import math
import os
import reprlib
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.sources.base import (DEFAULT_MAX_IMAGE_BYTES, JobSettings, RawRecord, Scan,
                                        content_digest, lone_surrogate, make_key, printable)
from preprocessing.sources.options import option
from preprocessing.templates import IMAGE_TAG, Turn
from vwlmm_data import storage
from vwlmm_data.storage import S3Options

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


# In a sample's members: the names of members over the size limit (left unread).
TOO_LARGE = "__too_large__"


def _iter_samples(stream, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
                  ) -> Iterator[tuple[str, dict[str, bytes], int, int]]:
    """Group consecutive tar members by key: (key, {ext: bytes}, start offset, end offset).

    A member over ``max_bytes`` is not read: its name goes to ``members[TOO_LARGE]``.
    """
    cur_key, cur, start, end = None, {}, 0, 0
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = _split_name(m.name)
            if key != cur_key:
                if cur_key is not None:
                    yield cur_key, cur, start, end
                cur_key, cur, start = key, {}, m.offset
            if m.size > max_bytes:
                cur.setdefault(TOO_LARGE, []).append(f"{printable(m.name)} ({m.size} bytes)")
            else:
                cur[ext] = tf.extractfile(m).read()
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


def _digest(members: dict[str, bytes], meta: dict) -> str | None:
    """Dedup identity of a tar sample: its image bytes and its tar caption (None: no image,
    or a member over the size limit: the sample is a reject)."""
    if TOO_LARGE in members:
        return None
    image = _image(members)
    text = _caption(members, meta) or ""
    return content_digest([image], text) if image is not None else None


def scan(tar_uri: str, s3: S3Options = S3Options(),
         max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[dict]:
    """Per sample: key, byte range and dedup digest (image bytes + tar caption)."""
    out = []
    try:
        with storage.open_read(tar_uri, s3) as f:
            for key, members, start, end in _iter_samples(f, max_bytes):
                meta = _tar_meta(members)
                out.append({
                    "key": make_key("laion", _source_id(key, meta)),
                    "start": start,
                    "end": end,
                    "digest": _digest(members, meta),
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
    except (ValueError, RecursionError):  # not JSON / nested deeper than the parser goes
        return {}


def _source_id(tar_key: str, meta: dict) -> str:
    key = meta.get("key")
    return printable(str(key) if isinstance(key, (str, int)) and key != "" else
                     os.path.basename(tar_key))


def check_parquet(uri: str, s3: S3Options = S3Options()) -> None:
    """ValueError naming ``uri`` unless its footer reads and its schema has a ``key`` column."""
    try:
        with storage.open_random_access(uri, s3) as f:
            names = pq.read_schema(f).names
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a broken file
        raise ValueError(f"{uri}: not a readable parquet file: {exc}") from exc
    if "key" not in names:
        raise ValueError(f"{uri}: parquet has no 'key' column to join img2dataset tars on")


@dataclass
class ParquetMeta:
    """A tar's parquet metadata: rows by key, the keys on more than one row (which row is
    meant is unknown: their records are rejects) and, when the ``key`` column is not text (it
    cannot be joined with tar keys), why: every record is then a reject."""

    rows: dict[str, dict]
    duplicates: dict[str, int]
    bad_key_column: str | None = None


def _load_parquet(uri: str, s3: S3Options) -> ParquetMeta:
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri, s3)))
    except FileNotFoundError:
        raise
    except Exception as exc:  # data pages broken behind a readable footer
        raise ValueError(f"{uri}: not a readable parquet file: {exc}") from exc
    if "key" not in table.column_names:
        raise ValueError(f"{uri}: parquet has no 'key' column to join img2dataset tars on")
    key_type = table.schema.field("key").type
    if not (pa.types.is_string(key_type) or pa.types.is_large_string(key_type)):
        return ParquetMeta({}, {}, f"parquet column 'key' is {key_type}, not text: {uri}")
    rows = table.to_pylist()
    counts = Counter(r["key"] for r in rows)
    return ParquetMeta({r["key"]: r for r in rows},
                       {k: n for k, n in counts.items() if n > 1})


def _member_error(key: str, members: dict, meta: dict) -> tuple[str, str] | None:
    if TOO_LARGE in members:
        too_large = ", ".join(members[TOO_LARGE])
        return "file_too_large", f"tar sample {key!r}: {too_large} over the limit"
    bad = lone_surrogate(meta)
    if bad is not None:
        return "bad_text", f"tar sample {key!r}: lone UTF-16 surrogate in metadata {bad}"
    return None


def read_unit(tar_uri: str, parquet_uri: str | None, start: int, end: int,
              s3: S3Options = S3Options(),
              max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Iterator[RawRecord]:
    """The records of bytes ``[start, end)`` of one tar, joined with its parquet row."""
    table = _load_parquet(parquet_uri, s3) if parquet_uri else None
    with storage.open_read(tar_uri, s3, start, end) as f:
        for key, members, _, _ in _iter_samples(f, max_bytes):
            meta = _tar_meta(members)
            sid = _source_id(key, meta)
            rec = RawRecord(key=make_key("laion", sid), source_id=sid)
            rec.error = _member_error(printable(key), members, meta)
            if rec.error is not None:
                yield rec
                continue
            if table is not None:
                row = table.rows.get(sid)
                if table.bad_key_column is not None:
                    rec.error = ("metadata_bad_type", table.bad_key_column)
                elif sid in table.duplicates:
                    rec.error = ("metadata_duplicate_key", f"key {sid!r} is on "
                                 f"{table.duplicates[sid]} rows of {parquet_uri}")
                elif row is None:
                    rec.error = ("metadata_missing", f"key {sid!r} not in {parquet_uri}")
                if rec.error is not None:
                    yield rec
                    continue
                meta.update({k: v for k, v in row.items() if v is not None})
            rec.meta = {k: meta[k] for k in sorted(meta)}
            caption = _caption(members, meta)
            image = _image(members)
            if image is None:
                rec.error = ("image_missing", f"tar sample {printable(key)!r} has no image member")
            elif caption is None:
                rec.error = ("missing_caption", f"tar sample {printable(key)!r} has no caption")
            elif lone_surrogate(caption) is not None:
                rec.error = ("bad_text", f"tar sample {printable(key)!r}: lone UTF-16 surrogate "
                                         "in the caption")
            else:
                rec.images = [image]
                rec.turns = [Turn("human", IMAGE_TAG), Turn("gpt", caption)]
            yield rec


@dataclass(frozen=True)
class LaionOptions:
    """LAION's filters: metadata scores (a record without the score is kept) and caption length."""

    max_punsafe: float | None = option(None, "reject punsafe above this, e.g. 0.5", float)
    max_pwatermark: float | None = option(None, "reject pwatermark above this, e.g. 0.8", float)
    min_similarity: float | None = option(None, "reject CLIP similarity below this, e.g. 0.28",
                                          float)
    min_caption_chars: int = option(1, "reject captions shorter than this", int)
    max_caption_chars: int | None = option(None, "reject captions longer than this", int)

    def __post_init__(self) -> None:
        if self.min_caption_chars < 0:
            raise ValueError(f"config field 'min_caption_chars'={self.min_caption_chars!r}: "
                             "must be >= 0")


def _score(meta: dict, name: str) -> float | None:
    """The score ``name`` of a record (None: absent, null or NaN); ValueError when it is not a
    number (a string, a list, a bool): its filter cannot be applied."""
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} is {type(value).__name__} {reprlib.repr(value)}, not a number")
    return None if math.isnan(value) else float(value)


def reject(rec: RawRecord, opts: LaionOptions) -> tuple[str, str] | None:
    """The score filters (a score that is not a number is ``metadata_bad_type`` when its filter
    is on), then the caption length limits."""
    for name, limit, reason, above in (
        ("punsafe", opts.max_punsafe, "unsafe", True),
        ("pwatermark", opts.max_pwatermark, "watermark", True),
        ("similarity", opts.min_similarity, "low_similarity", False),
    ):
        if limit is None:
            continue
        try:
            value = _score(rec.meta, name)
        except ValueError as exc:
            return "metadata_bad_type", str(exc)
        if value is not None and (value > limit if above else value < limit):
            return reason, f"{name}={value:g} {'>' if above else '<'} {limit:g}"
    if not rec.turns:
        return None
    n = len(rec.turns[-1].text.strip())
    if n < opts.min_caption_chars:
        return "caption_too_short", f"{n} chars < {opts.min_caption_chars}"
    if opts.max_caption_chars is not None and n > opts.max_caption_chars:
        return "caption_too_long", f"{n} chars > {opts.max_caption_chars}"
    return None


class LaionSource:
    """img2dataset output: units are byte ranges of a tar, digests come with the scan."""

    name = "laion"
    aliases: tuple[str, ...] = ()
    help = "img2dataset tars (+ parquet metadata joined by key)"
    needs_image_root = False
    options = LaionOptions

    def input_files(self, files: list[str]) -> list[tuple[str, dict]]:
        """Tars paired with their parquets; local parquets' footers and schemas are read here,
        so a broken one stops the job before anything is planned, naming the file (S3 ones,
        which need the job's S3 options, in the scan of their tar)."""
        pairs = pair_inputs(files)
        local = [p for _, p in pairs if p is not None and not storage.is_s3(p)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(check_parquet, local))
        return [(tar, {"parquet": parquet}) for tar, parquet in pairs]

    def scan(self, uri: str, cfg: JobSettings, scratch: str) -> Scan:
        if not storage.exists(uri, cfg.s3):
            raise FileNotFoundError(f"input {uri} does not exist")
        parquet = os.path.splitext(uri)[0] + ".parquet"  # pair_inputs' pairing, without listing
        if any(storage.s3_pattern_names(p, parquet) for p in cfg.inputs):
            check_parquet(parquet, cfg.s3)
        records = scan(uri, cfg.s3, cfg.max_image_bytes)
        sps = cfg.samples_per_shard
        units = [{"start": chunk[0]["start"], "end": chunk[-1]["end"], "num_records": len(chunk)}
                 for chunk in (records[c:c + sps] for c in range(0, len(records), sps))]
        return Scan(keys=[r["key"] for r in records], digests=[r["digest"] for r in records],
                    units=units)

    def digests(self, unit: dict, cfg: JobSettings) -> list[str | None]:
        with storage.open_read(unit["file"], cfg.s3, unit["start"], unit["end"]) as f:
            return [_digest(members, _tar_meta(members))
                    for _, members, _, _ in _iter_samples(f, cfg.max_image_bytes)]

    def read_unit(self, unit: dict, cfg: JobSettings) -> Iterator[RawRecord]:
        return read_unit(unit["file"], unit["parquet"], unit["start"], unit["end"], cfg.s3,
                         cfg.max_image_bytes)

    def reject(self, rec: RawRecord, cfg: JobSettings) -> tuple[str, str] | None:
        return reject(rec, cfg.source_options)

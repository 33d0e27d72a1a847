"""Sectioned files: written whole by one task, read one section at a time by many tasks.

A distributed step in which S senders each hand rows to R receivers (a shuffle) writes one file
per sender rather than S x R small files. The file is an 8-byte magic, the section count R, then
R + 1 little-endian uint64 offsets, then the R sections, each an Arrow IPC stream (an empty
section takes no bytes). Receiver r range-reads its two offsets and then its section: every read
is proportional to the reader's own data, two ranged GETs on an object store.

Arrow rather than JSON: columns of positions, keys and digests are half the bytes and are
sorted and concatenated in C++; the IPC bytes are deterministic, so reruns rewrite the same file.
"""

from __future__ import annotations

import struct

import pyarrow as pa

from vwlmm_data import storage
from vwlmm_data.storage import S3Options

_MAGIC = b"VWSECT01"
_HEAD = struct.Struct("<8sQ")
_OFFSET = struct.Struct("<Q")


def write_sections(uri: str, schema: pa.Schema, sections: list[pa.Table | None],
                   s3: S3Options = S3Options()) -> None:
    """Atomically write ``sections`` (None or empty: no rows) as one sectioned file."""
    bodies = []
    for table in sections:
        if table is None or table.num_rows == 0:
            bodies.append(b"")
            continue
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(table.cast(schema))
        bodies.append(sink.getvalue().to_pybytes())
    first = _HEAD.size + _OFFSET.size * (len(bodies) + 1)
    offsets = [first]
    for body in bodies:
        offsets.append(offsets[-1] + len(body))
    head = _HEAD.pack(_MAGIC, len(bodies)) + b"".join(_OFFSET.pack(o) for o in offsets)
    storage.write_bytes(uri, head + b"".join(bodies), s3)


def read_section(uri: str, index: int, schema: pa.Schema, s3: S3Options = S3Options()) -> pa.Table:
    """Section ``index`` of a sectioned file (an empty table with ``schema`` when it has no rows)."""
    at = _HEAD.size + _OFFSET.size * index
    head = storage.read_bytes(uri, s3, 0, at + 2 * _OFFSET.size)
    magic, count = _HEAD.unpack_from(head)
    if magic != _MAGIC:
        raise ValueError(f"{uri} is not a sectioned file")
    if not 0 <= index < count:
        raise IndexError(f"{uri} has {count} section(s), not {index + 1}")
    start, end = struct.unpack_from("<QQ", head, at)
    if start == end:
        return schema.empty_table()
    table = pa.ipc.open_stream(storage.read_bytes(uri, s3, start, end)).read_all()
    if not table.schema.equals(schema):
        raise ValueError(f"{uri} section {index} has schema {table.schema}, expected {schema}")
    return table

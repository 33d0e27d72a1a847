"""Read a W&B offline run file (``run-*.wandb``) in tests: its history rows, step by step.

The file is a 7-byte header (``:W&B``, a 2-byte key, a version byte) followed by a LevelDB-style
log: 32 KiB blocks of records (crc32, 2-byte length, type: full / first / middle / last) whose
payloads are ``wandb.proto.wandb_internal_pb2.Record`` messages. wandb no longer ships a Python
reader for it; this one reads only what the metrics test compares.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterator

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:
            pos += room  # block trailer padding
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
        else:
            break  # zero padding at the end of the file


def history(run_file: Path) -> Dict[int, Dict[str, float]]:
    """step -> {metric name: value} of every ``run.log`` in the file."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows: Dict[int, Dict[str, float]] = {}
    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
               for item in record.history.item}
        rows[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows

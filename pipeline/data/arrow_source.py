"""Random access into Arrow IPC shards (memory-mapped locally, range reads on s3://).

Each loader worker opens the shards itself on first use (memory maps and S3 handles do not
survive pickling into worker processes).
"""

from __future__ import annotations

import bisect
from typing import Any, Dict, List, Optional

import numpy as np

from pipeline.data.order import is_validation_key
from vwlmm_data.contract import ShardInfo
from vwlmm_data.storage import S3Options, open_random_access

_COLUMNS = ("key", "input_ids", "labels", "images", "num_images")


class ArrowShards:
    """Rows of all shards as one indexable sequence, in manifest order."""

    def __init__(self, shards: List[ShardInfo], s3: S3Options = S3Options()) -> None:
        self.shards = shards
        self.s3 = s3
        self.offsets = np.cumsum([0] + [s.num_samples for s in shards]).tolist()
        self._readers: Dict[int, Any] = {}
        self._batch_offsets: Dict[int, List[int]] = {}
        self._cached: Optional[tuple] = None

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self):  # open files never travel to loader workers
        state = self.__dict__.copy()
        state.update(_readers={}, _batch_offsets={}, _cached=None)
        return state

    def _reader(self, shard: int):
        if shard not in self._readers:
            import pyarrow as pa

            info = self.shards[shard]
            try:
                reader = pa.ipc.open_file(open_random_access(info.path, self.s3))
            except Exception as exc:
                raise OSError(f"{info.path}: not a readable Arrow IPC file ({exc})") from exc
            missing = [c for c in _COLUMNS if c not in reader.schema.names]
            if missing:
                raise ValueError(f"{info.path}: missing column(s) {missing} (data contract)")
            sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
            if sum(sizes) != info.num_samples:
                raise ValueError(f"{info.path}: holds {sum(sizes)} rows but manifest.json says "
                                 f"{info.num_samples}")
            self._readers[shard] = reader
            self._batch_offsets[shard] = np.cumsum([0] + sizes).tolist()
        return self._readers[shard]

    def where(self, index: int) -> str:
        shard = bisect.bisect_right(self.offsets, index) - 1
        return f"{self.shards[shard].path} row {index - self.offsets[shard]}"

    def keys(self) -> List[str]:
        """All sample keys (reads only the key column)."""
        return self.column("key")

    def column(self, name: str) -> List[Any]:
        """One column of every row, in order (reads only that column)."""
        out: List[Any] = []
        for shard in range(len(self.shards)):
            reader = self._reader(shard)
            if name not in reader.schema.names:
                raise ValueError(f"{self.shards[shard].path}: no column {name!r} (data contract)")
            for i in range(reader.num_record_batches):
                out.extend(reader.get_batch(i).column(name).to_pylist())
        return out

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[shard]
        reader = self._reader(shard)
        boffs = self._batch_offsets[shard]
        b = bisect.bisect_right(boffs, row) - 1
        if self._cached is None or self._cached[:2] != (shard, b):
            self._cached = (shard, b, reader.get_batch(b))
        batch = self._cached[2]
        r = row - boffs[b]
        return {c: batch.column(c)[r].as_py() for c in _COLUMNS}


def split_indices(source: ArrowShards, valid_fraction: float) -> tuple:
    """(train indices, validation indices) by stable key hash."""
    if valid_fraction <= 0:
        return np.arange(len(source)), np.zeros(0, dtype=np.int64)
    valid = np.array([is_validation_key(k, valid_fraction) for k in source.keys()], dtype=bool)
    return np.flatnonzero(~valid), np.flatnonzero(valid)

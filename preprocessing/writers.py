"""Shard writers: WebDataset tar and Arrow IPC file, staged locally and committed atomically.

Both are byte-deterministic (fixed tar mtime/owner, no timestamps in Arrow), which is what makes
"1 worker == N workers" and "killed + resumed == clean" checkable with a byte compare.
"""

from __future__ import annotations

import pyarrow as pa
import webdataset as wds

from vwlmm_data.contract import ARROW_SCHEMA
from vwlmm_data.samples import Sample, to_members
from vwlmm_data.storage import S3Options, StagedFile


class WebDatasetShardWriter:
    format = "webdataset"

    def __init__(self, target: str, s3: S3Options = S3Options()):
        self._staged = StagedFile(target, s3)
        # An integer mtime: a float one makes tarfile add a PAX header (1 KiB) to every member.
        self._tar = wds.TarWriter(self._staged.file, encoder=False, mtime=0,
                                  user="vwlmm", group="vwlmm", mode=0o444)
        self.sample_offsets: list[int] = []  # where each sample's first member starts
        self.end_offset = 0  # where the last sample ends (the end-of-archive blocks follow)

    def write(self, s: Sample) -> None:
        self.sample_offsets.append(self._tar.tarstream.offset)
        self._tar.write(to_members(s))

    def commit(self) -> None:
        self.end_offset = self._tar.tarstream.offset
        self._tar.tarstream.close()  # end-of-archive blocks; leaves the file open for commit
        self._staged.commit()

    def abort(self) -> None:
        self._staged.abort()


class ArrowShardWriter:
    """Arrow IPC file writer; rows are flushed in small record batches to bound memory."""

    format = "arrow"
    BATCH = 64

    def __init__(self, target: str, s3: S3Options = S3Options()):
        self._staged = StagedFile(target, s3)
        self._writer = pa.ipc.new_file(self._staged.file, ARROW_SCHEMA)
        self._rows: list[Sample] = []

    def write(self, s: Sample) -> None:
        self._rows.append(s)
        if len(self._rows) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        r = self._rows
        columns = [
            [s.key for s in r], [s.source_id for s in r], [s.images for s in r],
            [s.input_ids for s in r], [s.labels for s in r], [s.num_images for s in r],
            [s.num_tokens for s in r], [s.template for s in r], [s.meta for s in r],
        ]
        arrays = [pa.array(c, type=f.type) for c, f in zip(columns, ARROW_SCHEMA)]
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=ARROW_SCHEMA))
        self._rows = []

    def commit(self) -> None:
        self._flush()
        self._writer.close()
        self._staged.commit()

    def abort(self) -> None:
        self._staged.abort()


WRITERS = {"webdataset": WebDatasetShardWriter, "arrow": ArrowShardWriter}

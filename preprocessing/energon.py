"""Megatron-Energon metadata beside our WebDataset shards, so Energon loads them as they are.

Energon reads a WebDataset folder that has a ``.nv-meta`` folder (its documented on-disk format):

- ``dataset.yaml``: how samples become Python objects. Our samples (a JSON header, two
  ``.npy`` arrays and the images: the members ``vwlmm_data/samples.py`` defines) fit no Energon
  sample type, so the dataset is declared *crude* (``CrudeWebdataset``): the user's task encoder
  cooks the raw parts, and the ``vwlmm_format`` subflavor names the layout it cooks;
- ``split.yaml``: ``split_parts`` (train / val / test -> shard names) and ``exclude``; every
  shard is in ``train``, since splitting is a training decision;
- ``.info.yaml``: ``shard_counts`` (shard name -> number of samples);

and, beside each shard, ``<shard>.tar.idx``: the byte offset of each sample in the tar, then
the offset where the last sample ends, as unsigned 64-bit integers, for random access.
The shard list can be long (one shard per unit), so both lists are written as a stream.
"""

from __future__ import annotations

import struct

import yaml

from vwlmm_data import storage
from vwlmm_data.contract import FORMAT_VERSION
from vwlmm_data.storage import S3Options, StagedFile

NV_META = ".nv-meta"
TAR_INDEX_SUFFIX = ".idx"  # appended to the shard name: shard-000000.tar.idx


def dataset_config() -> dict:
    return {"__module__": "megatron.energon", "__class__": "CrudeWebdataset",
            "subflavors": {"vwlmm_format": FORMAT_VERSION}}


def tar_index(sample_offsets: list[int], end: int) -> bytes:
    """The ``.tar.idx`` bytes: each sample's first header offset, then the end of the last one."""
    return struct.pack(f"<{len(sample_offsets) + 1}Q", *sample_offsets, end)


class EnergonMetaWriter:
    """Streams ``.nv-meta`` for the shards below ``root`` (names relative to it), in order."""

    def __init__(self, root: str, s3: S3Options = S3Options()):
        self.root, self.s3 = root, s3
        meta = storage.join(root, NV_META)
        self._info = StagedFile(storage.join(meta, ".info.yaml"), s3)
        self._split = StagedFile(storage.join(meta, "split.yaml"), s3)
        self._info.file.write(b"shard_counts:\n")
        self._split.file.write(b"split_parts:\n  train:\n")
        self.num_shards = 0

    def add(self, name: str, num_samples: int) -> None:
        quoted = yaml.safe_dump(name, default_style='"').strip().encode()
        self._info.file.write(b"  " + quoted + b": %d\n" % num_samples)
        self._split.file.write(b"  - " + quoted + b"\n")
        self.num_shards += 1

    def commit(self) -> None:
        if not self.num_shards:
            self._split.file.write(b"    []\n")
            self._info.file.write(b"  {}\n")
        self._split.file.write(b"  val: []\n  test: []\nexclude: []\n")
        self._info.commit()
        self._split.commit()
        storage.write_bytes(storage.join(self.root, NV_META, "dataset.yaml"),
                            yaml.safe_dump(dataset_config(), sort_keys=False).encode(), self.s3)

    def abort(self) -> None:
        self._info.abort()
        self._split.abort()

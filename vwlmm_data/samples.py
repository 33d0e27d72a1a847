"""A stored sample, and the WebDataset members it is written as and read back from.

The shard writer (``preprocessing/writers.py``), the synthetic fixtures
(``pipeline/data/synthetic.py``) and the streaming reader (``pipeline/data/wds_source.py``) all
go through ``to_members`` / ``from_members``, so the member names below are spelled here only.
One sample ``<key>`` of a tar is:

- ``<key>.json``: the header (``Sample.header``: source id, template, image and token counts,
  the record's metadata as a JSON string), keys sorted, UTF-8;
- ``<key>.input_ids.npy`` / ``<key>.labels.npy``: int32 arrays in numpy's ``.npy`` format;
- ``<key>.img<i>.jpg``: the ``i``-th image, JPEG RGB at the vision resolution, un-normalised.

The Arrow format stores the same fields as columns (``contract.ARROW_SCHEMA``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from vwlmm_data.errors import Refusal

HEADER = "json"
INPUT_IDS = "input_ids.npy"
LABELS = "labels.npy"


def image_member(index: int) -> str:
    return f"img{index}.jpg"


class BadSampleError(Refusal, ValueError):
    """A stored sample breaks the data contract; the message names the sample and the shard."""


@dataclass
class Sample:
    """One tokenized sample, as both shard formats store it (``ARROW_SCHEMA``'s columns)."""

    key: str
    source_id: str
    images: list[bytes]
    input_ids: np.ndarray
    labels: np.ndarray
    num_images: int
    num_tokens: int  # each image counting its patch tokens
    template: str
    meta: str  # the record's metadata, a JSON object as a string

    def header(self) -> dict:
        """The ``<key>.json`` member."""
        return {"source_id": self.source_id, "template": self.template,
                "num_images": self.num_images, "num_tokens": self.num_tokens, "meta": self.meta}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise BadSampleError(f"{where}: not a numpy .npy array ({exc})") from exc


def to_members(sample: Sample) -> dict[str, bytes | str]:
    """The sample as webdataset's ``TarWriter`` takes it: ``__key__`` and member -> bytes."""
    members: dict[str, bytes | str] = {
        "__key__": sample.key,
        HEADER: json.dumps(sample.header(), sort_keys=True, ensure_ascii=False).encode(),
        INPUT_IDS: _npy(sample.input_ids),
        LABELS: _npy(sample.labels),
    }
    for i, jpg in enumerate(sample.images):
        members[image_member(i)] = jpg
    return members


def from_members(members: Mapping[str, bytes], url: str) -> Sample:
    """A sample grouped by key from a tar at ``url`` (``__key__`` + member -> bytes).

    Training needs only the header's ``num_images``; its other fields describe the sample and
    read as empty when absent."""
    key = members["__key__"]
    where = f"sample {key!r} in {url}"
    for name in (HEADER, INPUT_IDS, LABELS):
        if name not in members:
            raise BadSampleError(f"{where}: member {key}.{name} is missing")
    try:
        header = json.loads(members[HEADER])
    except ValueError as exc:
        raise BadSampleError(f"{where}: member {key}.{HEADER} is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise BadSampleError(f"{where}: member {key}.{HEADER} is not a JSON object")
    n = int(header.get("num_images", 0))
    images = []
    for i in range(n):
        if image_member(i) not in members:
            raise BadSampleError(f"{where}: num_images={n} but {key}.{image_member(i)} is missing")
        images.append(members[image_member(i)])
    return Sample(key=key, source_id=header.get("source_id", ""), images=images,
                  input_ids=_load_npy(members[INPUT_IDS], where),
                  labels=_load_npy(members[LABELS], where), num_images=n,
                  num_tokens=int(header.get("num_tokens", 0)),
                  template=header.get("template", ""), meta=header.get("meta", ""))

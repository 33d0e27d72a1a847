"""Readers of raw inputs. Each source turns one input file into records in two passes:

``scan`` (cheap, per input file): a stable key, a dedup digest and a locator per record, so the
driver can cut the file into units and decide duplicates globally before any image is decoded;
``read_unit`` (per unit, in a worker): the records of one unit with their image bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from preprocessing.templates import Turn

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def make_key(source: str, source_id: str) -> str:
    """``<source>-<id>`` restricted to ``[A-Za-z0-9_-]`` (WebDataset splits keys at dots).

    Ids that had to be rewritten get a short hash of the original, so ``a.b`` and ``a_b`` stay
    distinct.
    """
    clean = _UNSAFE.sub("_", source_id)
    if clean != source_id or not clean:
        clean += "-" + hashlib.sha1(source_id.encode()).hexdigest()[:8]
    return f"{source}-{clean}"


def content_digest(images: list[bytes], text: str) -> str:
    """Exact-duplicate identity: sha256 of each image's bytes plus the text."""
    h = hashlib.sha256()
    for data in images:
        h.update(hashlib.sha256(data).digest())
    h.update(text.encode())
    return h.hexdigest()[:32]


@dataclass
class RawRecord:
    """One input record, images loaded; ``error`` is a (reason, detail) found while reading."""

    key: str
    source_id: str
    turns: list[Turn] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    error: tuple[str, str] | None = None

    def meta_json(self) -> str:
        return json.dumps(self.meta, sort_keys=True, ensure_ascii=False, default=str)

"""What every raw-input source provides: the ``Source`` protocol and the record it yields.

A job sees its inputs only through a source object (``preprocessing/sources/__init__.py``
registers them by name), in two passes:

1. ``scan`` (per input file, cheap): each record's stable key, its dedup digest when the scan
   can compute one without decoding images, and the file cut into *units* of at most
   ``samples_per_shard`` records, each a *locator* (a byte range of a tar, a unit file of a
   JSON array) holding its ``num_records``. The driver decides duplicates and key collisions
   over the whole job from these, before any image is decoded.
2. ``read_unit`` (per unit, in a worker): the unit's records with their image bytes.

A *unit* handed back to a source is ``{**input fields, **locator, "file": uri, "scratch":
prefix, ...}``: the input fields come from ``input_files`` (LAION: the parquet joined to a tar)
and ``scratch`` is the prefix ``scan`` wrote under, so whatever a source put in them and in its
locators comes back to it, and the driver never interprets either. Locators are stored in the
job's state folder: they hold no path of the output, so a job's state does not depend on where
its output is.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from preprocessing.templates import Turn
from vwlmm_data.storage import S3Options

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# The default bound of one image file / tar member (``PreprocessConfig.max_image_bytes``).
DEFAULT_MAX_IMAGE_BYTES = 64 << 20


def make_key(source: str, source_id: str) -> str:
    """``<source>-<id>`` restricted to ``[A-Za-z0-9_-]`` (WebDataset splits keys at dots).

    Ids that had to be rewritten get a short hash of the original, so ``a.b`` and ``a_b`` stay
    distinct.
    """
    clean = _UNSAFE.sub("_", source_id)
    if clean != source_id or not clean:
        clean += "-" + hashlib.sha1(source_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{source}-{clean}"


def content_digest(images: list[bytes], text: str) -> str:
    """Exact-duplicate identity: sha256 of each image's bytes plus the text."""
    h = hashlib.sha256()
    for data in images:
        h.update(hashlib.sha256(data).digest())
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def printable(text: str) -> str:
    """``text`` as valid Unicode: a lone UTF-16 surrogate (``"\\ud83d"`` from scraped JSON,
    which no UTF-8 writer accepts) becomes its escape. For ids kept in rejects and keys."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate(value) -> str | None:
    """Where a string inside ``value`` (str / list / dict, any depth) holds a lone UTF-16
    surrogate, as a short path (``conversations[1].value``); None when there is none.

    Such text cannot be written as UTF-8 (shard headers, Arrow columns, rejects.jsonl), so
    sources reject the record ("bad_text"). Iterative: depth is no limit.
    """
    stack = [(value, "")]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where or "value"
        elif isinstance(v, dict):
            stack += [(k, f"{where}.<key>") for k in v]
            stack += [(x, f"{where}.{printable(str(k))}" if where else printable(str(k)))
                      for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return None


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


@dataclass
class Scan:
    """One input file as the driver plans it (JSON-serialisable through ``dataclasses.asdict``).

    ``digests`` is None when they need the images: ``Source.digests`` then computes them per
    unit, in parallel tasks, before planning (only when dedup is on).
    """

    keys: list[str]
    digests: list[str | None] | None
    units: list[dict]  # locators in record order, each with "num_records"


class JobSettings(Protocol):
    """What a source reads of the job's configuration (``preprocessing/config.py``'s
    ``PreprocessConfig`` provides it; sources depend on these attributes, not on that module)."""

    inputs: list[str]  # the --input patterns as given
    image_root: str | None
    samples_per_shard: int
    max_image_bytes: int
    source_options: Any  # an instance of this source's ``options`` dataclass

    @property
    def s3(self) -> S3Options: ...


class Source(Protocol):
    """A kind of raw input (``--source``). Methods run in Ray tasks: keep instances stateless."""

    name: str  # the --source value and the prefix of every sample key
    aliases: tuple[str, ...]  # other --source values meaning this source
    help: str  # one line for --help: what the inputs are
    needs_image_root: bool  # records name images relative to --image-root
    # The dataclass of this source's own options (``preprocessing/sources/options.py``: its
    # flags, config and manifest fields); ``options.NoOptions`` when it has none.
    options: type

    def input_files(self, files: list[str]) -> list[tuple[str, dict]]:
        """The expanded ``--input`` files -> the files to scan, in order, each with the fields
        every unit of it carries. Raises ValueError on inputs this source cannot take."""

    def scan(self, uri: str, cfg: JobSettings, scratch: str) -> Scan:
        """Keys, digests and unit locators of one input file; ``scratch`` is a private prefix
        (under the job's state folder) for files the units will read (``unit["scratch"]``)."""

    def digests(self, unit: dict, cfg: JobSettings) -> list[str | None]:
        """The dedup digest of each record of one unit (None: never a duplicate)."""

    def read_unit(self, unit: dict, cfg: JobSettings) -> Iterator[RawRecord]:
        """The unit's records, in scan order, with their images."""

    def reject(self, rec: RawRecord, cfg: JobSettings) -> tuple[str, str] | None:
        """A (reason, detail) when this source's own filters reject ``rec``, else None."""

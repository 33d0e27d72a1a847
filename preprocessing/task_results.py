"""What the tasks of ``preprocessing/worker.py`` hand back, as typed records.

``ScanResult`` and ``UnitDone`` go from a task to the driver (``preprocessing/runner.py``);
``UnitRecord`` is a unit's result record in the job's state folder
(``_state/units/NNNNNN.json``), written by its task and merged into the manifest by
``preprocessing/finalize.py``, so both sides read and write it through the same dataclass.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from vwlmm_data.samples import Sample


@dataclass
class ScanResult:
    """One scanned input file: its counts, and its unit locators when the dedup digests still
    have to be computed from the images (None otherwise)."""

    index: int
    num_records: int
    num_units: int
    units_to_digest: list[dict] | None


@dataclass
class UnitStats:
    """Token and image counts over the samples a unit kept (``Statistics`` in the manifest)."""

    num_tokens: int = 0
    min_tokens: int | None = None  # None when no sample was kept
    max_tokens: int = 0
    num_text_tokens: int = 0
    num_supervised_tokens: int = 0
    num_images: int = 0
    num_text_only: int = 0
    adjusted: dict = dataclasses.field(default_factory=dict)  # Statistics.adjusted

    def add(self, s: Sample) -> None:
        self.num_tokens += s.num_tokens
        self.min_tokens = s.num_tokens if self.min_tokens is None else min(self.min_tokens,
                                                                            s.num_tokens)
        self.max_tokens = max(self.max_tokens, s.num_tokens)
        self.num_text_tokens += len(s.input_ids) - s.num_images
        self.num_supervised_tokens += int((s.labels >= 0).sum())
        self.num_images += s.num_images
        self.num_text_only += s.num_images == 0
        meta = json.loads(s.meta) if s.meta else {}
        for name in meta.get("adjusted", ()) if isinstance(meta, dict) else ():
            self.adjusted[name] = self.adjusted.get(name, 0) + 1


@dataclass
class UnitRecord:
    """A finished unit: its shards (``ShardInfo`` dicts, paths relative to the output), its
    rejects (``rejects.jsonl`` lines) and counts, and the planned unit it was cut from."""

    index: int
    num_records: int
    num_samples: int
    shards: list[dict]
    rejects: list[dict]
    stats: UnitStats
    unit: dict  # ``plan.unit_identity`` of the unit

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "UnitRecord":
        d = json.loads(data)
        return cls(**{**d, "stats": UnitStats(**d["stats"])})


@dataclass
class UnitDone:
    """What the driver keeps of a processed unit: counts for its progress line and summary."""

    index: int
    num_records: int
    num_samples: int
    num_rejected: int
    cpu_seconds: float = field(default=0.0)

    @classmethod
    def of(cls, record: UnitRecord, cpu_seconds: float = 0.0) -> "UnitDone":
        return cls(record.index, record.num_records, record.num_samples, len(record.rejects),
                   cpu_seconds)

"""Planning a job: input files -> units (one per output shard) with their dedup decisions.

A unit is a slice of one input file of at most ``samples_per_shard`` records; its global index
names its shard, so shard boundaries and names depend only on the inputs and the config, never on
the number of workers or partitions. Input files are grouped into *batches* of about
``batch_records`` records: a batch is the grain of the dedup step's map side
(``preprocessing/dedup.py``) and of the plan files the driver streams units from, so the driver
holds per-file counts and one batch's units at a time, whatever the number of records.

Every step runs as tasks through an ``Executor``: ``executor(fn, args_iterable)`` calls
``fn(*args)`` for each args tuple, in any order and with any parallelism, and yields the results.
Ray runs them in a job; tests run them in-process.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from preprocessing import dedup
from preprocessing.job_state import PLAN_VERSION, JobState, read_scan

Executor = Callable[[Callable[..., Any], Iterable[tuple]], Iterable[Any]]

# A reducer of the dedup step holds its partition's records as Python objects (~200 B each):
# one million records per partition keeps a task near 200 MB.
RECORDS_PER_PARTITION = 1_000_000
# Map-side batches: M batches x P partitions section reads in each dedup step.
BATCH_RECORDS = 1_000_000


def serial_executor(fn: Callable[..., Any], args: Iterable[tuple]) -> Iterator[Any]:
    """Run the tasks one after the other in this process."""
    for a in args:
        yield fn(*a)


def default_partitions(num_records: int) -> int:
    return max(1, math.ceil(num_records / RECORDS_PER_PARTITION))


@dataclass(frozen=True)
class InputFile:
    """One input of the job; ``unit_fields`` go into each of its units (LAION: its parquet)."""

    index: int
    uri: str
    unit_fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    """Consecutive input files, planned together (``first_unit``: the index of their first unit)."""

    index: int
    files: tuple[InputFile, ...]
    first_unit: int

    def file_refs(self) -> list[tuple[int, str]]:
        return [(f.index, f.uri) for f in self.files]


def make_batches(files: list[InputFile], num_units: list[int], num_records: list[int],
                 batch_records: int = BATCH_RECORDS) -> list[Batch]:
    """Cut the input list into batches of about ``batch_records`` records (whole files)."""
    batches: list[Batch] = []
    group: list[InputFile] = []
    first_unit = unit = records = 0
    for f, n_units, n_records in zip(files, num_units, num_records, strict=True):
        group.append(f)
        unit += n_units
        records += n_records
        if records >= batch_records:
            batches.append(Batch(len(batches), tuple(group), first_unit))
            group, first_unit, records = [], unit, 0
    if group or not batches:
        batches.append(Batch(len(batches), tuple(group), first_unit))
    return batches


def file_unit(f: InputFile, locator: dict, unit_fields: dict) -> dict:
    """One unit of input ``f`` as planned, less its global index: ``unit_fields`` (the job's),
    ``f``'s own fields, the scan's locator, and the file. The digest step hands the same dict
    (through ``task_unit``) to ``Source.digests`` that ``Source.read_unit`` later gets."""
    return {**unit_fields, **f.unit_fields, **locator, "file": f.uri, "file_index": f.index}


@dataclass(frozen=True)
class BatchCounts:
    """What planning one batch found (a ``plan_batch`` task's result)."""

    batch: int
    num_units: int
    num_records: int
    num_duplicates: int
    num_renames: int

    @classmethod
    def of(cls, plan: dict) -> "BatchCounts":
        """The counts of a batch's plan file."""
        return cls(batch=plan["batch"], num_units=len(plan["units"]),
                   num_records=sum(u["num_records"] for u in plan["units"]),
                   num_duplicates=plan["num_duplicates"], num_renames=plan["num_renames"])


def plan_batch(state: JobState, partitions: int, batch: Batch, unit_fields: dict) -> BatchCounts:
    """Write the batch's plan file (its units) and decisions file (one JSON line per unit that has
    decisions, ``{"record index in unit": ["duplicate" | "rename", key]}``); returns its counts."""
    uri = state.plan_uri(batch.index)
    if state.exists(uri):
        return BatchCounts.of(state.read_json(uri))
    decisions = iter(dedup.read_batch_decisions(state, partitions, batch.index))
    pending = next(decisions, None)
    units, lines, offset = [], [], 0
    n_dup = n_rename = 0
    for f in batch.files:
        scan = read_scan(state, f.index, f.uri)
        if scan is None:
            raise FileNotFoundError(f"no scan of input {f.index} ({f.uri}) in {state.root}")
        first_record = 0
        for locator in scan["units"]:
            end_pos = dedup.position(f.index, first_record + locator["num_records"])
            mine: dict[str, list] = {}
            while pending is not None and pending[0] < end_pos:
                pos, duplicate, key = pending
                kind = "duplicate" if duplicate else "rename"
                mine[str((pos & 0xFFFFFFFF) - first_record)] = [kind, key]
                n_dup += duplicate
                n_rename += not duplicate
                pending = next(decisions, None)
            unit = {**file_unit(f, locator, unit_fields), "index": batch.first_unit + len(units)}
            if mine:
                line = (json.dumps(mine, sort_keys=True, ensure_ascii=False) + "\n").encode()
                unit["decisions"] = [batch.index, offset, offset + len(line)]
                lines.append(line)
                offset += len(line)
            units.append(unit)
            first_record += locator["num_records"]
    if pending is not None:
        raise RuntimeError(f"batch {batch.index}: a decision for position {pending[0]} has no unit")
    state.write_bytes(state.decisions_uri(batch.index), b"".join(lines))
    plan = {"batch": batch.index, "units": units, "num_duplicates": n_dup, "num_renames": n_rename}
    state.write_json(uri, plan)  # last: its presence means the batch is planned
    return BatchCounts.of(plan)


def build_plan(run: Executor, state: JobState, files: list[InputFile], num_units: list[int],
               num_records: list[int], *, partitions: int, dedup_on: bool, unit_fields: dict,
               batch_records: int = BATCH_RECORDS) -> dict:
    """The dedup and plan steps over scanned inputs; writes and returns the plan summary."""
    batches = make_batches(files, num_units, num_records, batch_records)
    first_files = [b.files[0].index if b.files else 0 for b in batches]
    P, M = partitions, len(batches)
    for _ in run(dedup.map_batch, ((state, P, dedup_on, b.index, b.file_refs()) for b in batches)):
        pass
    for _ in run(dedup.reduce_digests, ((state, P, p, M) for p in range(P))):
        pass
    for _ in run(dedup.reduce_keys, ((state, P, q, first_files) for q in range(P))):
        pass
    counts = sorted(run(plan_batch, ((state, P, b, unit_fields) for b in batches)),
                    key=lambda c: c.batch)
    summary = {
        "plan_version": PLAN_VERSION,
        "num_files": len(files),
        "num_records": sum(c.num_records for c in counts),
        "num_units": sum(c.num_units for c in counts),
        "num_duplicates": sum(c.num_duplicates for c in counts),
        "num_renames": sum(c.num_renames for c in counts),
        "batches": [{"index": b.index, "first_unit": b.first_unit, "num_units": c.num_units,
                     "files": [b.files[0].index, b.files[-1].index + 1] if b.files else [0, 0]}
                    for b, c in zip(batches, counts)],
    }
    state.write_json(state.plan_summary_uri, summary)  # last: the plan is complete
    return summary


def read_plan(state: JobState) -> dict | None:
    """The plan summary of a completely planned job, else None."""
    if not state.exists(state.plan_summary_uri):
        return None
    summary = state.read_json(state.plan_summary_uri)
    if summary.get("plan_version") != PLAN_VERSION:
        raise ValueError(f"{state.plan_summary_uri} was written by another version of the planner")
    return summary


def iter_units(state: JobState, summary: dict) -> Iterator[dict]:
    """Every planned unit in index order, one batch's plan file in memory at a time."""
    for b in summary["batches"]:
        yield from state.read_json(state.plan_uri(b["index"]))["units"]


def task_unit(state: JobState, unit: dict) -> dict:
    """A planned unit as its task gets it: with ``scratch``, the prefix of the files its source
    wrote while scanning (``JobState.records_prefix``). Added here, not planned, so that plan
    files and unit records do not depend on where the output folder is."""
    return {**unit, "scratch": state.records_prefix(unit["file_index"])}


def unit_identity(unit: dict) -> dict:
    """What a unit was cut from (input file, byte range or unit file, record count): a unit's
    result record carries it, and a record that does not match its planned unit is refused."""
    return {k: v for k, v in unit.items() if k not in ("decisions", "scratch")}


def unit_decisions(state: JobState, unit: dict) -> dict[str, list]:
    """The decisions of one unit: a ranged read of its own line of its batch's decisions file."""
    span = unit.get("decisions")
    if not span:
        return {}
    batch, start, end = span
    return json.loads(state.read_bytes(state.decisions_uri(batch), start, end))

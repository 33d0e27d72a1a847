"""The layout of a job's state folder (``<output>/_state``) and the records that make resuming safe.

Everything a job learns before it writes shards lives here, written by the tasks that learn it,
so the driver holds only per-file and per-unit metadata, never per-record data:

- ``config.json``: the config fingerprint (a rerun with another config is refused);
- ``inputs.json``: the expanded input list with each file's size and version (mtime or ETag),
  compared on every rerun: unit indices are positions in this list, so a file that appeared,
  vanished or changed since would silently move records between units;
- ``scan/NNNNNN.json``: per input file, its records' keys and dedup digests and its units'
  locators (byte ranges of a tar, or the unit files a JSON array was split into);
- ``dedup/pPPPP/...``: the partitioned dedup step's intermediate files (``preprocessing/dedup.py``),
  one folder per partition count, since they differ with it while the decisions do not;
- ``plan/MMMMMM.json`` + ``.decisions.jsonl``: per batch of input files, its units (global index,
  file, byte range or unit file) and each unit's duplicate / rename decisions;
- ``plan.json``: written last by the planning step; its presence means the plan is complete;
- ``units/NNNNNN.json``: a unit's result, committed after its shards (its presence means done).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from vwlmm_data import storage
from vwlmm_data.storage import FileInfo, S3Options

STATE_DIR = "_state"
PLAN_VERSION = 1


class InputsChanged(ValueError):
    """The input files differ from those the job in ``--output`` was planned with."""


class JobState:
    """Paths inside one job's state folder (local or S3), and the S3 options to reach it."""

    def __init__(self, output: str, s3: S3Options = S3Options()):
        self.output, self.s3 = output, s3
        self.root = storage.join(output, STATE_DIR)

    def exists(self, uri: str) -> bool:
        return storage.exists(uri, self.s3)

    def read_bytes(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        return storage.read_bytes(uri, self.s3, start, end)

    def write_bytes(self, uri: str, data: bytes) -> None:
        storage.write_bytes(uri, data, self.s3)

    def read_json(self, uri: str):
        return json.loads(self.read_bytes(uri))

    def write_json(self, uri: str, data) -> None:
        self.write_bytes(uri, json.dumps(data, sort_keys=True, ensure_ascii=False).encode())

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def config_uri(self) -> str:
        return self.path("config.json")

    @property
    def inputs_uri(self) -> str:
        return self.path("inputs.json")

    @property
    def plan_summary_uri(self) -> str:
        return self.path("plan.json")

    def scan_uri(self, file_index: int) -> str:
        return self.path("scan", f"{file_index:06d}.json")

    def records_prefix(self, file_index: int) -> str:
        """Prefix of the unit files a JSON-array input is split into (``-CCCCCC.jsonl`` each)."""
        return self.path("records", f"{file_index:06d}")

    def digests_uri(self, file_index: int, chunk: int) -> str:
        return self.path("digests", f"{file_index:06d}-{chunk:06d}.json")

    def dedup_uri(self, partitions: int, step: str, index: int) -> str:
        return self.path("dedup", f"p{partitions:04d}", step, f"{index:06d}.sections")

    def plan_uri(self, batch: int) -> str:
        return self.path("plan", f"{batch:06d}.json")

    def decisions_uri(self, batch: int) -> str:
        return self.path("plan", f"{batch:06d}.decisions.jsonl")

    def unit_record_uri(self, unit_index: int) -> str:
        return self.path("units", f"{unit_index:06d}.json")

    @property
    def units_dir(self) -> str:
        return self.path("units")


def _listing(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def input_changes(recorded: list[FileInfo], current: list[FileInfo]) -> list[str]:
    """What differs between two input lists, one phrase per kind of change (empty: nothing)."""
    old = {f.uri: f for f in recorded}
    new = {f.uri: f for f in current}
    added = [u for u in new if u not in old]
    removed = [u for u in old if u not in new]
    changed = [f"{u} (size {old[u].size} -> {new[u].size}, version {old[u].version} -> "
               f"{new[u].version})" for u in new if u in old and old[u] != new[u]]
    out = []
    if added:
        out.append(f"{len(added)} added: {_listing(added)}")
    if removed:
        out.append(f"{len(removed)} removed: {_listing(removed)}")
    if changed:
        out.append(f"{len(changed)} changed: {_listing(changed)}")
    if not out and [f.uri for f in recorded] != [f.uri for f in current]:
        out.append("the same files in another order")
    return out


def check_inputs(state: JobState, current: list[FileInfo], complete: bool) -> None:
    """Record the input list on a first run; on a rerun refuse any difference, naming it.

    ``complete``: the job already has its manifest; its dataset does not hold the new inputs.
    """
    if not state.exists(state.inputs_uri):
        state.write_json(state.inputs_uri, {"files": [asdict(f) for f in current]})
        return
    recorded = [FileInfo(**f) for f in state.read_json(state.inputs_uri)["files"]]
    changes = input_changes(recorded, current)
    if not changes:
        return
    what = "; ".join(changes)
    if complete:
        raise InputsChanged(
            f"{state.output} is complete, but its input files changed since it was made ({what}): "
            "the dataset does not contain them. Use a new --output (or --overwrite) to include them")
    raise InputsChanged(
        f"{state.output} holds an unfinished job whose input files changed since it was planned "
        f"({what}): its finished units were cut from the old list, so resuming would skip or "
        "repeat records. Restore the inputs to resume, or use a new --output (or --overwrite)")


def write_scan(state: JobState, file_index: int, uri: str, keys: list[str],
               digests: list[str | None] | None, units: list[dict]) -> None:
    """One input file's scan: record keys, dedup digests (None: computed per unit later) and
    one locator per unit (each with its ``num_records``)."""
    state.write_json(state.scan_uri(file_index), {"file": uri, "num_records": len(keys), "keys": keys,
                                            "digests": digests, "units": units})


def read_scan(state: JobState, file_index: int, uri: str) -> dict | None:
    """The cached scan of input ``file_index`` if it was made from ``uri``, else None."""
    cache = state.scan_uri(file_index)
    if not state.exists(cache):
        return None
    scan = state.read_json(cache)
    return scan if scan["file"] == uri else None


def file_digests(state: JobState, file_index: int, scan: dict) -> list[str | None]:
    """The dedup digests of one file's records: from its scan, or from its per-unit digest files."""
    if scan["digests"] is not None:
        return scan["digests"]
    out: list[str | None] = []
    for chunk in range(len(scan["units"])):
        out += state.read_json(state.digests_uri(file_index, chunk))
    return out

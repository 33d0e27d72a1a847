"""Exact dedup and key-collision decisions for the whole job, as a partitioned, distributed step.

The decisions are those of one sequential pass over every record in global input order
(file index, record index):

- with dedup on, a record whose digest was already seen is ``["duplicate", K]``, K the final key
  of the first record with that digest; duplicates claim no key;
- every other record claims its key or, when taken, the first free of ``key_1``, ``key_2``, ...
  (``["rename", new_key]``): the same id twice with different content keeps both.

Nothing here holds every record in one place. Each decision depends only on records that share a
*digest* (is it the first occurrence?) or a key *root* (which candidate is free?), so both steps
split into P independent partitions that each see their records in global order:

1. ``map_batch`` (one task per batch of input files) reads the batch's scans and sends each record
   to the partition of ``crc32(digest) % P`` when it takes part in dedup, else straight to the key
   step, partition ``crc32(root) % P``;
2. ``reduce_digests`` (one task per digest partition) finds first occurrences. Originals go on to
   the key partition of their own root; a duplicate goes to the key partition of its
   *original's* root, where that original's final key will be decided;
3. ``reduce_keys`` (one task per key partition) assigns keys in global order and resolves each
   duplicate to its original's final key, then files its decisions under the batch that holds
   each record (``read_batch_decisions``).

A key's root is the key without its trailing ``_<n>`` groups (``n`` as ``str`` writes a positive
integer: ``a_1_2`` -> ``a``, ``a_01`` stays): every candidate of key ``k`` (``k_1``, ``k_2``, ...)
has ``k``'s root, so two records can only compete for a key inside one root partition. Ids such
as ``sa_123`` share the root ``sa``: such a family lands in one partition (exact, not parallel).

Positions are ``file_index << 32 | record_index``; every section is in position order because map
batches are consecutive runs of files, so reducers concatenate instead of sorting where they can.
Each task writes one sectioned file (``preprocessing/sections.py``) atomically and skips the work
when it already exists, so a killed job reruns only what was missing and rewrites the same bytes.
"""

from __future__ import annotations

import bisect
import re
import zlib

import pyarrow as pa

from preprocessing.job_state import JobState, file_digests, read_scan
from preprocessing.sections import read_section, write_sections

ROWS = pa.schema([("pos", pa.int64()), ("key", pa.string()), ("digest", pa.string()),
                  ("orig", pa.int64())])
DECISIONS = pa.schema([("pos", pa.int64()), ("duplicate", pa.bool_()), ("key", pa.string())])
_CANDIDATE_SUFFIX = re.compile(r"(?:_[1-9][0-9]*)+$")


def position(file_index: int, record_index: int) -> int:
    return file_index << 32 | record_index


def key_root(key: str) -> str:
    return _CANDIDATE_SUFFIX.sub("", key)


def key_partition(key: str, partitions: int) -> int:
    return zlib.crc32(key_root(key).encode()) % partitions


def digest_partition(digest: str, partitions: int) -> int:
    return zlib.crc32(digest.encode()) % partitions


def _table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pydict({f.name: [r[i] for r in rows] for i, f in enumerate(schema)},
                                schema=schema)


def map_batch(state: JobState, partitions: int, dedup: bool, batch: int,
              files: list[tuple[int, str]]) -> None:
    """Step 1: route the records of the input files ``files`` ((index, uri), consecutive)."""
    out = state.dedup_uri(partitions, "map", batch)
    if state.exists(out):
        return
    sections: list[list[tuple]] = [[] for _ in range(2 * partitions)]
    for file_index, uri in files:
        scan = read_scan(state, file_index, uri)
        if scan is None:
            raise FileNotFoundError(f"no scan of input {file_index} ({uri}) in {state.root}")
        digests = file_digests(state, file_index, scan) if dedup else [None] * scan["num_records"]
        for i, (key, digest) in enumerate(zip(scan["keys"], digests, strict=True)):
            pos = position(file_index, i)
            if digest:
                sections[digest_partition(digest, partitions)].append((pos, key, digest, None))
            else:
                sections[partitions + key_partition(key, partitions)].append((pos, key, None, None))
    write_sections(out, ROWS, [_table(s, ROWS) for s in sections], state.s3)


def reduce_digests(state: JobState, partitions: int, part: int, num_batches: int) -> None:
    """Step 2: first occurrences among the records of digest partition ``part``."""
    out = state.dedup_uri(partitions, "first", part)
    if state.exists(out):
        return
    rows = pa.concat_tables([read_section(state.dedup_uri(partitions, "map", m), part, ROWS, state.s3)
                             for m in range(num_batches)])
    first: dict[str, tuple[int, str]] = {}
    sections: list[list[tuple]] = [[] for _ in range(partitions)]
    for pos, key, digest in zip(rows["pos"].to_pylist(), rows["key"].to_pylist(),
                                rows["digest"].to_pylist()):
        original = first.get(digest)
        if original is None:
            first[digest] = (pos, key)
            sections[key_partition(key, partitions)].append((pos, key, None, None))
        else:
            sections[key_partition(original[1], partitions)].append((pos, None, None, original[0]))
    write_sections(out, ROWS, [_table(s, ROWS) for s in sections], state.s3)


def assign_keys(rows: list[tuple[int, str | None, int | None]]) -> list[tuple[int, bool, str]]:
    """The sequential pass over one key partition: ``rows`` are (pos, key, orig) in position
    order, ``key`` None for a duplicate of the record at ``orig``; returns the decisions
    (pos, duplicate, key) of the records that have one."""
    used: set[str] = set()
    next_suffix: dict[str, int] = {}  # base key -> first candidate suffix not yet known taken
    final_of: dict[int, str] = {}
    needed = {orig for _, key, orig in rows if key is None}
    decisions = []
    for pos, key, orig in rows:
        if key is None:
            decisions.append((pos, True, final_of[orig]))
            continue
        n = next_suffix.get(key, 0)
        claimed = key if n == 0 else f"{key}_{n}"
        while claimed in used:  # ``used`` only grows: earlier candidates stay taken
            n += 1
            claimed = f"{key}_{n}"
        used.add(claimed)
        if n:
            next_suffix[key] = n + 1
            decisions.append((pos, False, claimed))
        if pos in needed:
            final_of[pos] = claimed
    return decisions


def reduce_keys(state: JobState, partitions: int, part: int, batch_first_files: list[int]) -> None:
    """Step 3: keys of key partition ``part``; decisions filed by batch (``batch_first_files``:
    the first input file of each batch)."""
    out = state.dedup_uri(partitions, "keys", part)
    if state.exists(out):
        return
    parts = [read_section(state.dedup_uri(partitions, "map", m), partitions + part, ROWS, state.s3)
             for m in range(len(batch_first_files))]
    parts += [read_section(state.dedup_uri(partitions, "first", p), part, ROWS, state.s3)
              for p in range(partitions)]
    rows = pa.concat_tables(parts).sort_by("pos")
    decisions = assign_keys(list(zip(rows["pos"].to_pylist(), rows["key"].to_pylist(),
                                     rows["orig"].to_pylist())))
    positions = [d[0] for d in decisions]
    cuts = [bisect.bisect_left(positions, position(f, 0)) for f in batch_first_files[1:]]
    bounds = list(zip([0, *cuts], [*cuts, len(decisions)]))
    write_sections(out, DECISIONS, [_table(decisions[a:b], DECISIONS) for a, b in bounds], state.s3)


def read_batch_decisions(state: JobState, partitions: int,
                         batch: int) -> list[tuple[int, bool, str]]:
    """Every decision about the records of one batch, in position order."""
    table = pa.concat_tables([
        read_section(state.dedup_uri(partitions, "keys", q), batch, DECISIONS, state.s3)
        for q in range(partitions)]).sort_by("pos")
    return list(zip(table["pos"].to_pylist(), table["duplicate"].to_pylist(),
                    table["key"].to_pylist()))

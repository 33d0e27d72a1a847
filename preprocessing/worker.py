"""What one Ray task does, for each per-input step of a job: scan one input file, compute the
dedup digests of one unit, process one unit (a slice of one input file) into one shard per
format. The dedup and plan steps between them are tasks of ``dedup.py`` and ``plan.py``.

Every task gets the job's ``PreprocessConfig`` as the driver validated it (Ray ships the object;
unpickling does not rerun its checks) and hands back a typed result (``task_results.py``).

A unit is idempotent and exactly-once: its shards are committed atomically, then its result
record (``_state/units/NNNNNN.json``) is committed; a rerun skips units whose record exists and
redoes any other unit from scratch, producing the same bytes.
"""

from __future__ import annotations

import time

from preprocessing.config import PreprocessConfig
from preprocessing.encode import Reject, encode
from preprocessing.energon import TAR_INDEX_SUFFIX, tar_index
from preprocessing.job_state import JobState, read_scan, write_scan
from preprocessing.plan import InputFile, unit_decisions, unit_identity
from preprocessing.sources import get_source
from preprocessing.task_results import ScanResult, UnitDone, UnitRecord, UnitStats
from preprocessing.tokenizer import load_tokenizer
from preprocessing.writers import WRITERS
from vwlmm_data import storage
from vwlmm_data import hooks
from vwlmm_data.contract import shard_name

def shard_relpath(cfg: PreprocessConfig, fmt: str, index: int) -> str:
    name = shard_name(index, fmt)
    return f"{fmt}/{name}" if cfg.format == "both" else name


def scan_file(cfg: PreprocessConfig, f: InputFile) -> ScanResult:
    """Scan one input file into the job state (kept: a rerun reuses it)."""
    state = JobState(cfg.output, cfg.s3)
    scan = read_scan(state, f.index, f.uri)
    if scan is None:
        found = get_source(cfg.source).scan(f.uri, cfg, state.records_prefix(f.index))
        write_scan(state, f.index, f.uri, found.keys, found.digests, found.units)
        scan = {"keys": found.keys, "digests": found.digests, "units": found.units}
    return ScanResult(index=f.index, num_records=len(scan["keys"]), num_units=len(scan["units"]),
                      units_to_digest=scan["units"] if scan["digests"] is None else None)


def digest_unit(cfg: PreprocessConfig, f: InputFile, chunk: int, unit: dict) -> None:
    """Dedup digests of one unit (the source reads its images), into the job state."""
    state = JobState(cfg.output, cfg.s3)
    uri = state.digests_uri(f.index, chunk)
    if not state.exists(uri):
        state.write_json(uri, get_source(cfg.source).digests(unit, cfg))


def process_unit(cfg: PreprocessConfig, unit: dict) -> UnitDone:
    """Write the unit's shards and its result record; returns its counts.

    The unit's decisions (the job's global dedup, ``preprocessing/dedup.py``) are its own line of
    its plan batch's decisions file: a record's index within the unit (a string, as JSON keys
    are) -> ``["duplicate", first_key]`` or ``["rename", new_key]`` for colliding ids.
    """
    state = JobState(cfg.output, cfg.s3)
    record_uri = state.unit_record_uri(unit["index"])
    if storage.exists(record_uri, cfg.s3):
        return UnitDone.of(UnitRecord.from_json(storage.read_bytes(record_uri, cfg.s3)))
    decisions = unit_decisions(state, unit)
    cpu0 = time.process_time()
    tokenizer = load_tokenizer(cfg.tokenizer)
    shards = {fmt: storage.join(cfg.output, shard_relpath(cfg, fmt, unit["index"]))
              for fmt in cfg.formats}
    writers = {fmt: WRITERS[fmt](uri, cfg.s3) for fmt, uri in shards.items()}
    rejects, stats, n_good, n_records = [], UnitStats(), 0, 0
    try:
        for i, rec in enumerate(get_source(unit["source"]).read_unit(unit, cfg)):
            n_records += 1
            hooks.fire("preprocess.unit_progress", unit=unit["index"], done=i,
                       total=unit["num_records"])
            decision = decisions.get(str(i))
            try:
                if decision and decision[0] == "duplicate":
                    raise Reject("duplicate", f"same image and text as {decision[1]}")
                if decision and decision[0] == "rename":
                    rec.key = decision[1]
                sample = encode(rec, cfg, tokenizer)
            except Reject as exc:
                rejects.append({"source_id": rec.source_id, "key": rec.key,
                                "reason": exc.reason, "detail": exc.detail})
                continue
            for w in writers.values():
                w.write(sample)
            n_good += 1
            stats.add(sample)
        if n_records != unit["num_records"]:
            raise RuntimeError(f"unit {unit['index']}: read {n_records} records, the scan "
                               f"found {unit['num_records']}: did the input change?")
        shard_entries = []
        for fmt, w in writers.items():
            if n_good:
                w.commit()
                if fmt == "webdataset":  # Energon's random-access index (preprocessing/energon.py)
                    storage.write_bytes(shards[fmt] + TAR_INDEX_SUFFIX,
                                        tar_index(w.sample_offsets, w.end_offset), cfg.s3)
                shard_entries.append({"path": shard_relpath(cfg, fmt, unit["index"]), "format": fmt,
                                      "num_samples": n_good, "num_tokens": stats.num_tokens})
            else:
                w.abort()  # an all-rejected unit leaves no empty shard behind
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    record = UnitRecord(index=unit["index"], num_records=n_records, num_samples=n_good,
                        shards=shard_entries, rejects=rejects, stats=stats,
                        unit=unit_identity(unit))
    storage.write_bytes(record_uri, record.to_json(), cfg.s3)
    return UnitDone.of(record, cpu_seconds=time.process_time() - cpu0)

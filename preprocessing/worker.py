"""What one Ray task does: process one unit (a slice of one input file) into one shard per format.

A unit is idempotent and exactly-once: its shards are committed atomically, then its result
record (``_state/units/NNNNNN.json``) is committed; a rerun skips units whose record exists and
redoes any other unit from scratch, producing the same bytes.
"""

from __future__ import annotations

import json
import os
import time

from preprocessing.config import PreprocessConfig
from preprocessing.encode import Reject, Sample, encode
from preprocessing.energon import TAR_INDEX_SUFFIX, tar_index
from preprocessing.job_state import JobState
from preprocessing.plan import unit_decisions, unit_identity
from preprocessing.sources import get_source
from preprocessing.tokenizer import load_tokenizer
from preprocessing.writers import WRITERS
from vwlmm_data import storage
from vwlmm_data.contract import shard_name

# Test hook: "UNIT:MARKER_PATH" makes the worker processing UNIT die halfway, once (the marker
# file records that it happened), to prove that Ray's retry + atomic commits give exactly-once.
CRASH_ENV = "VWLMM_PREPROCESS_CRASH_ONCE"


def shard_relpath(cfg: PreprocessConfig, fmt: str, index: int) -> str:
    name = shard_name(index, fmt)
    return f"{fmt}/{name}" if cfg.format == "both" else name


def _maybe_crash(unit_index: int, done: int, total: int) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec or done != total // 2:
        return
    target, _, marker = spec.partition(":")
    if int(target) == unit_index and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(17)  # a hard worker death, as an OOM kill would be


def _new_stats() -> dict:
    return {"num_tokens": 0, "min_tokens": None, "max_tokens": 0, "num_text_tokens": 0,
            "num_supervised_tokens": 0, "num_images": 0, "num_text_only": 0}


def _add_stats(st: dict, s: Sample) -> None:
    st["num_tokens"] += s.num_tokens
    st["min_tokens"] = s.num_tokens if st["min_tokens"] is None else min(st["min_tokens"], s.num_tokens)
    st["max_tokens"] = max(st["max_tokens"], s.num_tokens)
    st["num_text_tokens"] += len(s.input_ids) - s.num_images
    st["num_supervised_tokens"] += int((s.labels >= 0).sum())
    st["num_images"] += s.num_images
    st["num_text_only"] += s.num_images == 0


def process_unit(cfg_dict: dict, unit: dict) -> dict:
    """Write the unit's shards and its result record; returns the record.

    The unit's decisions (the job's global dedup, ``preprocessing/dedup.py``) are its own line of
    its plan batch's decisions file: a record's index within the unit (a string, as JSON keys
    are) -> ``["duplicate", first_key]`` or ``["rename", new_key]`` for colliding ids.
    """
    cfg = PreprocessConfig(**cfg_dict)
    state = JobState(cfg.output, cfg.s3)
    record_uri = state.unit_record_uri(unit["index"])
    if storage.exists(record_uri, cfg.s3):
        return json.loads(storage.read_bytes(record_uri, cfg.s3))
    decisions = unit_decisions(state, unit)
    cpu0 = time.process_time()
    tokenizer = load_tokenizer(cfg.tokenizer)
    shards = {fmt: storage.join(cfg.output, shard_relpath(cfg, fmt, unit["index"]))
              for fmt in cfg.formats}
    writers = {fmt: WRITERS[fmt](uri, cfg.s3) for fmt, uri in shards.items()}
    rejects, stats, n_good, n_records = [], _new_stats(), 0, 0
    try:
        for i, rec in enumerate(get_source(unit["source"]).read_unit(unit, cfg)):
            n_records += 1
            _maybe_crash(unit["index"], i, unit["num_records"])
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
            _add_stats(stats, sample)
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
                                      "num_samples": n_good, "num_tokens": stats["num_tokens"]})
            else:
                w.abort()  # an all-rejected unit leaves no empty shard behind
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    result = {"index": unit["index"], "num_records": n_records, "num_samples": n_good,
              "shards": shard_entries, "rejects": rejects, "stats": stats,
              "unit": unit_identity(unit)}
    storage.write_bytes(record_uri, json.dumps(result, sort_keys=True).encode(), cfg.s3)
    result["cpu_seconds"] = time.process_time() - cpu0  # for the driver's summary only
    return result

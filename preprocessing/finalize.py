"""The end of a job: per-unit results merged, as a stream, into rejects, Energon metadata and
the manifest (committed last: its presence means the dataset is complete).

Unit records are read in unit order with a bounded window of reads in flight (one small object
each, so an object store is read in parallel), and each is dropped once merged: the driver holds
running counts and the shard list (one entry per shard, as the manifest lists them), never the
samples' rejects. Every record is checked against the plan's unit (input file and range), so a
record written for another cut of the inputs can never enter a manifest.
"""

from __future__ import annotations

import collections
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from preprocessing.energon import EnergonMetaWriter
from preprocessing.job_state import InputsChanged, JobState
from preprocessing.plan import unit_identity
from preprocessing.task_results import UnitRecord
from vwlmm_data import storage
from vwlmm_data.contract import (FORMAT_VERSION, IGNORE_INDEX, IMAGE_TOKEN_ID, REJECTS_NAME,
                                 Manifest, ShardInfo, Statistics, TokenizerInfo, VisionInfo,
                                 write_manifest)
from vwlmm_data.storage import StagedFile

READ_WINDOW = 64
_SUMMED = ("num_tokens", "num_text_tokens", "num_supervised_tokens", "num_images",
           "num_text_only")


def read_unit_records(state: JobState, units: Iterable[dict],
                      window: int = READ_WINDOW) -> Iterator[tuple[dict, UnitRecord]]:
    """(planned unit, its result record) in unit order, ``window`` reads in flight."""
    def read(unit: dict) -> UnitRecord:
        return UnitRecord.from_json(state.read_bytes(state.unit_record_uri(unit["index"])))

    with ThreadPoolExecutor(max_workers=window) as pool:
        pending: collections.deque = collections.deque()
        for unit in units:
            pending.append((unit, pool.submit(read, unit)))
            if len(pending) >= window:
                u, fut = pending.popleft()
                yield u, fut.result()
        while pending:
            u, fut = pending.popleft()
            yield u, fut.result()


def energon_root(output: str, fmt_folder: str | None) -> str:
    return storage.join(output, fmt_folder) if fmt_folder else output


def finalize(cfg, state: JobState, units: Iterable[dict], tok_info: TokenizerInfo,
             version: str) -> Manifest:
    """Merge the unit records of ``units`` (in order) into rejects.jsonl, ``.nv-meta`` (WebDataset
    output) and, last, manifest.json."""
    rejected: collections.Counter = collections.Counter()
    adjusted: collections.Counter = collections.Counter()
    totals = dict.fromkeys(("num_records", *_SUMMED), 0)
    min_tokens, max_tokens, num_samples = None, 0, 0
    shards: list[ShardInfo] = []
    energon = None
    if "webdataset" in cfg.formats:
        energon = EnergonMetaWriter(energon_root(cfg.output, "webdataset" if cfg.format == "both"
                                                 else None), cfg.s3)
    try:
        with StagedFile(storage.join(cfg.output, REJECTS_NAME), cfg.s3) as rejects_file:
            for unit, record in read_unit_records(state, units):
                if record.unit != unit_identity(unit):
                    raise InputsChanged(
                        f"{state.unit_record_uri(unit['index'])} was written for "
                        f"{record.unit}, but the plan's unit {unit['index']} is "
                        f"{unit_identity(unit)}: use a new --output (or --overwrite)")
                for rej in record.rejects:
                    rejected[rej["reason"]] += 1
                    rejects_file.file.write(
                        json.dumps(rej, sort_keys=True, ensure_ascii=False).encode() + b"\n")
                for s in record.shards:
                    shard = ShardInfo.from_dict(s)
                    shards.append(shard)
                    if energon is not None and shard.format == "webdataset":
                        energon.add(shard.path.rsplit("/", 1)[-1], shard.num_samples)
                st = record.stats
                totals["num_records"] += record.num_records
                for k in _SUMMED:
                    totals[k] += getattr(st, k)
                adjusted.update(st.adjusted)
                max_tokens = max(max_tokens, st.max_tokens)
                if st.min_tokens is not None:
                    min_tokens = st.min_tokens if min_tokens is None \
                        else min(min_tokens, st.min_tokens)
                num_samples += record.num_samples
        if energon is not None:
            energon.commit()
    except BaseException:
        if energon is not None:
            energon.abort()
        raise
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        num_samples=num_samples,
        rejected=dict(sorted(rejected.items())),
        shards=tuple(shards),
        statistics=Statistics(**totals, min_tokens=min_tokens, max_tokens=max_tokens,
                              mean_tokens=totals["num_tokens"] / num_samples if num_samples
                              else 0.0, adjusted=dict(sorted(adjusted.items()))),
        tokenizer=tok_info,
        template=cfg.template,
        image_token_id=IMAGE_TOKEN_ID,
        ignore_index=IGNORE_INDEX,
        image_size=cfg.image_size,
        image_mode=cfg.image_mode,
        num_patches_per_image=cfg.num_patches,
        max_seq_len=cfg.max_seq_len,
        formats=cfg.formats,
        config=cfg.content_dict(),
        vwlmm_version=version,
        vision=VisionInfo.of(cfg.vision_encoder),
    )
    write_manifest(cfg.output, manifest, cfg.s3)  # last: the dataset is complete
    return manifest

"""torch DataLoaders over either shard format, one per data-parallel rank.

Both formats yield ``(VWLMMBatch, keys)`` micro-batches in the order fixed by
:mod:`pipeline.data.order`, so the step loop never cares which format it reads:

* Arrow: a map-style dataset indexed by global position (seeded global shuffle, random
  access); the batch sampler starts at the checkpoint's consumed-sample count.
* WebDataset: an iterable stream of this rank's shards (shuffled per epoch, disjoint across
  ranks); resume skips whole shards by their manifest counts, then samples without decoding.
  Loader workers share the stream and each decodes every W-th micro-batch, so the
  DataLoader's round-robin reassembles the exact order.

With ``group_by_modality_length`` (Arrow only: it needs every sample's ``num_images`` and
``num_tokens`` up front) the train order is ``order.ModalityLengthGrouping``'s: steps of one
modality, similar lengths per micro-batch, still a pure function of (seed, position).

With ``packing`` the unit a loader yields is a whole step of this rank: its
``global_batch_size / DP`` samples (the same samples as without packing) packed into rows and
grouped into micro-batches (``collate_packed``), as ``(list of VWLMMBatch, keys)``. The number
of micro-batches then varies from step to step; the data position stays a sample count.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from pipeline.data.arrow_source import ArrowShards, split_indices
from pipeline.data.decode import decode_sample
from pipeline.data.order import (ModalityLengthGrouping, is_validation_key, position_to_item,
                                 rank_positions, rank_shards)
from pipeline.data.wds_source import iter_shard
from vwlmm_data.contract import IMAGE_TOKEN_ID, ShardInfo, VisionInfo
from vwlmm_data.storage import S3Options


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a rank's loader needs; plain data so it pickles into worker processes."""

    shards: Sequence[ShardInfo]  # resolved: ``path`` is what readers open
    format: str  # "arrow" | "webdataset"
    micro_batch_size: int
    global_batch_size: int
    dp_size: int
    dp_rank: int
    seed: int
    seq_length: int
    num_patches: int
    image_size: int
    pad_token_id: int
    vision: VisionInfo  # the normalisation images get (the model's encoder, manifest-checked)
    valid_fraction: float = 0.0
    num_workers: int = 0
    prefetch_factor: int = 4
    s3: S3Options = S3Options()
    # Pack samples into rows (micro_batch_size rows per micro-batch) instead of padding each.
    packing: bool = False
    # LLaVA's group_by_modality_length (pipeline/data/order.py ModalityLengthGrouping).
    group_by_modality_length: bool = False
    # Module-level function (samples, spec) -> batch; None = the model's collate_samples.
    collate_fn: Optional[Callable] = None
    # The model's vocabulary: every decoded sample's ids are checked against it (None: no check).
    vocab_size: Optional[int] = None


    @property
    def samples_per_item(self) -> int:
        """Samples behind one loader item: a micro-batch, or with packing a rank's whole step."""
        if self.packing:
            return self.global_batch_size // self.dp_size
        return self.micro_batch_size


def collate(samples: List[Dict[str, Any]], spec: LoaderSpec):
    """Decoded samples -> (VWLMMBatch, keys) through the model's own splicing/padding, or with
    packing -> (list of packed VWLMMBatch, keys in micro-batch order)."""
    if spec.collate_fn is not None:
        return spec.collate_fn(samples, spec), [s["key"] for s in samples]
    from megatron_vwlmm.model import collate_packed, collate_samples

    if spec.packing:
        batches, members = collate_packed(
            samples, seq_length=spec.seq_length, rows_per_micro_batch=spec.micro_batch_size,
            num_patches=spec.num_patches, pad_token_id=spec.pad_token_id,
            image_token_id=IMAGE_TOKEN_ID)
        return batches, [samples[i]["key"] for group in members for i in group]
    batch = collate_samples(samples, seq_length=spec.seq_length, num_patches=spec.num_patches,
                            pad_token_id=spec.pad_token_id, image_token_id=IMAGE_TOKEN_ID)
    return batch, [s["key"] for s in samples]


def _worker_init(_: int) -> None:
    """Loader workers leave termination signals to the trainer process.

    Slurm signals every process of a step (preemption, time limit, scancel): a worker dying of
    SIGTERM would crash the trainer before it can checkpoint. The trainer handles the signal,
    saves, and its exit reaps the workers.
    """
    torch.set_num_threads(1)
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


@atexit.register  # after multiprocessing's own exit hook, so it runs before it
def _kill_loader_workers() -> None:
    """At interpreter exit multiprocessing SIGTERMs daemonic children, then joins them: loader
    workers ignore SIGTERM, and when the trainer exits on an error (a collective timed out, a
    step raised) the failed step's frames keep the loader alive, so that join would wait
    forever and the rank would never exit. SIGKILL them instead (they only read data), with
    torch's SIGCHLD handler, which would report their deaths as a loader error, removed."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()


class ArrowPositions(Dataset):
    """Global position -> decoded sample, over the train or validation rows."""

    def __init__(self, source: ArrowShards, rows: np.ndarray, seed: int, shuffle: bool,
                 image_size: int, vision: VisionInfo,
                 grouping: Optional[ModalityLengthGrouping] = None,
                 vocab_size: Optional[int] = None) -> None:
        if len(rows) == 0:
            raise ValueError("the selected split holds no samples (check data.valid_fraction)")
        self.source, self.rows, self.seed, self.shuffle = source, rows, seed, shuffle
        self.image_size, self.vision, self.grouping = image_size, vision, grouping
        self.vocab_size = vocab_size

    def __len__(self) -> int:  # positions are unbounded; this is one epoch
        return len(self.rows)

    def __getitem__(self, position: int) -> Dict[str, Any]:
        item = self.grouping.item(position) if self.grouping is not None else \
            position_to_item(position, len(self.rows), self.seed, self.shuffle)
        row = int(self.rows[item])
        return decode_sample(self.source[row], self.image_size, self.source.where(row),
                             self.vision, self.vocab_size)


class WebDatasetStream(IterableDataset):
    """This rank's micro-batches from streamed shards, starting at a rank-local sample count."""

    def __init__(self, spec: LoaderSpec, split: str, start_sample: int, shuffle: bool) -> None:
        self.spec, self.split, self.start, self.shuffle = spec, split, start_sample, shuffle
        if len(spec.shards) < spec.dp_size:
            raise ValueError(f"data: {len(spec.shards)} WebDataset shards cannot feed "
                             f"{spec.dp_size} data-parallel ranks (need >= 1 shard per rank)")

    def _keep(self, key: str) -> bool:
        return is_validation_key(key, self.spec.valid_fraction) == (self.split == "valid")

    def _samples(self) -> Iterator[Dict[str, Any]]:
        """Raw samples of this rank from ``start`` on (undecoded), endless over epochs."""
        spec, skip = self.spec, self.start
        epoch = 0
        while True:
            kept = 0
            for s in rank_shards(len(spec.shards), spec.seed, epoch, spec.dp_size, spec.dp_rank,
                                 self.shuffle):
                shard = spec.shards[s]
                if skip >= shard.num_samples and spec.valid_fraction <= 0:
                    skip -= shard.num_samples  # whole shard already consumed: do not open it
                    kept += shard.num_samples
                    continue
                for raw in iter_shard(shard, spec.s3):
                    if not self._keep(raw["key"]):
                        continue
                    kept += 1
                    if skip > 0:
                        skip -= 1
                        continue
                    yield raw, shard.path
            if kept == 0:
                raise ValueError(f"data: rank {spec.dp_rank} found no {self.split} samples in "
                                 "its shards (check data.valid_fraction)")
            epoch += 1

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mbs, spec = self.spec.samples_per_item, self.spec
        pending: List = []
        index = 0
        for raw, url in self._samples():
            pending.append((raw, url))
            if len(pending) < mbs:
                continue
            if index % workers == worker:
                decoded = [decode_sample(r, spec.image_size, u, spec.vision, spec.vocab_size)
                           for r, u in pending]
                yield collate(decoded, spec)
            pending, index = [], index + 1


def _loader(dataset, spec: LoaderSpec, **kwargs) -> DataLoader:
    workers = spec.num_workers
    extra = dict(prefetch_factor=spec.prefetch_factor, persistent_workers=False) if workers else {}
    return DataLoader(dataset, num_workers=workers, worker_init_fn=_worker_init, **extra, **kwargs)


class RankData:
    """The train and validation streams of one DP rank for one run."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        if spec.format == "arrow":
            self.source = ArrowShards(list(spec.shards), spec.s3)
            self.train_rows, self.valid_rows = split_indices(self.source, spec.valid_fraction)
        elif spec.format != "webdataset":
            raise ValueError(f"data.format={spec.format!r}: expected arrow or webdataset")
        elif spec.group_by_modality_length:
            raise ValueError("data.group_by_modality_length needs each sample's num_images and "
                             "num_tokens before reading it; WebDataset shards are streamed. Use "
                             "data.format=arrow (preprocess with --format arrow or both)")

    @property
    def num_train_samples(self) -> Optional[int]:
        """Train-split size when known without reading (Arrow), else the manifest total."""
        if self.spec.format == "arrow":
            return len(self.train_rows)
        return sum(s.num_samples for s in self.spec.shards)

    def train_iterator(self, consumed_samples: int) -> Iterator:
        """(batch, keys) micro-batches from the global position ``consumed_samples`` on."""
        spec = self.spec
        if spec.format == "arrow":
            ds = ArrowPositions(self.source, self.train_rows, spec.seed, True, spec.image_size,
                                spec.vision, self._grouping(), spec.vocab_size)
            sampler = rank_positions(consumed_samples, spec.global_batch_size,
                                     spec.samples_per_item, spec.dp_size, spec.dp_rank)
            return iter(_loader(ds, spec, batch_sampler=sampler,
                                collate_fn=functools.partial(collate, spec=spec)))
        rank_start = consumed_samples // spec.dp_size
        stream = WebDatasetStream(spec, "train", rank_start, shuffle=True)
        return iter(_loader(stream, spec, batch_size=None))

    def _grouping(self) -> Optional[ModalityLengthGrouping]:
        spec = self.spec
        if not spec.group_by_modality_length:
            return None
        rows = self.train_rows
        return ModalityLengthGrouping(
            np.asarray(self.source.column("num_tokens"))[rows],
            np.asarray(self.source.column("num_images"))[rows] > 0, spec.seed,
            spec.global_batch_size, 1 if spec.packing else spec.micro_batch_size, spec.dp_size)

    def valid_iterator(self) -> Iterator:
        """Validation micro-batches of this rank, always from the start (comparable curves)."""
        spec = self.spec
        if spec.format == "arrow":
            ds = ArrowPositions(self.source, self.valid_rows, spec.seed, False, spec.image_size,
                                spec.vision, vocab_size=spec.vocab_size)
            sampler = rank_positions(0, spec.global_batch_size, spec.samples_per_item,
                                     spec.dp_size, spec.dp_rank)
            return iter(_loader(ds, spec, batch_sampler=sampler,
                                collate_fn=functools.partial(collate, spec=spec)))
        return iter(_loader(WebDatasetStream(spec, "valid", 0, shuffle=False), spec,
                            batch_size=None))


def build_rank_data(cfg, model_cfg, shards, s3: S3Options, dp_size: int):
    """(LoaderSpec, RankData or None) of a run (``pipeline/config.py``'s ``TrainConfig``) on this
    rank: only the first and last pipeline stages read data."""
    from megatron.core import parallel_state as ps


    spec = LoaderSpec(
        shards=tuple(shards), format=shards[0].format, packing=cfg.data.packing,
        group_by_modality_length=cfg.data.group_by_modality_length,
        micro_batch_size=cfg.data.micro_batch_size, global_batch_size=cfg.data.global_batch_size,
        dp_size=dp_size, dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
        seed=cfg.data.seed, seq_length=model_cfg.decoder.seq_length,
        num_patches=model_cfg.num_patches, image_size=model_cfg.vision.image_size,
        pad_token_id=cfg.data.pad_token_id, vision=VisionInfo.of(model_cfg.vision.kind),
        valid_fraction=cfg.data.valid_fraction,
        num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor, s3=s3,
        vocab_size=model_cfg.decoder.vocab_size)
    needs_data = ps.is_pipeline_first_stage(ignore_virtual=True) or \
        ps.is_pipeline_last_stage(ignore_virtual=True)
    return spec, (RankData(spec) if needs_data else None)

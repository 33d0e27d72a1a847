"""Which sample each data-parallel rank reads at each step: pure functions of (seed, position).

The global order is fixed by the seed alone, so a run restarted from a checkpoint's
consumed-sample count reads exactly the samples the uninterrupted run would have read, and
ranks never need to talk to each other about data.

Global batch ``b`` holds global positions ``[b*G, (b+1)*G)``; DP rank ``r`` owns the
contiguous slice ``[b*G + r*G/D, b*G + (r+1)*G/D)``, cut into micro-batches of ``m``.
A global position ``g`` maps to epoch ``g // N`` and to ``perm_epoch[g % N]``, or with
``data.group_by_modality_length`` to ``ModalityLengthGrouping.epoch_order(epoch)[g % N]``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Iterator, List

import numpy as np


def is_validation_key(key: str, fraction: float) -> bool:
    """Stable split by key hash: the same sample is held out whatever the format or shard layout."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@lru_cache(maxsize=4)
def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of ``range(num_items)`` used in ``epoch`` (a fresh one per epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def rank_positions(consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                   dp_size: int, dp_rank: int) -> Iterator[List[int]]:
    """Endless micro-batches of global positions for ``dp_rank``, starting after ``consumed``.

    ``consumed_samples`` must sit on a global-batch boundary (checkpoints are taken between
    optimizer steps, so it always does).
    """
    if consumed_samples % global_batch_size != 0:
        raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of the global "
                         f"batch size {global_batch_size}; the checkpoint does not match the "
                         "config")
    per_rank = global_batch_size // dp_size
    batch = consumed_samples // global_batch_size
    while True:
        start = batch * global_batch_size + dp_rank * per_rank
        for mb in range(0, per_rank, micro_batch_size):
            yield list(range(start + mb, start + mb + micro_batch_size))
        batch += 1


def position_to_item(position: int, num_items: int, seed: int, shuffle: bool = True) -> int:
    """The dataset item (index into the train split) at global ``position``."""
    epoch, offset = divmod(position, num_items)
    if not shuffle:
        return offset
    return int(epoch_permutation(num_items, seed, epoch)[offset])


def rank_shards(num_shards: int, seed: int, epoch: int, dp_size: int, dp_rank: int,
                shuffle: bool = True) -> List[int]:
    """Streaming formats: this rank's shards in ``epoch`` (shuffled list, dealt round-robin).

    Ranks get disjoint shards each epoch; their union is every shard.
    """
    order = epoch_permutation(num_shards, seed, epoch) if shuffle else np.arange(num_shards)
    return [int(s) for s in order[dp_rank::dp_size]]


class ModalityLengthGrouping:
    """``data.group_by_modality_length``: LLaVA-1.5's ``LengthGroupedSampler(group_by_modality=
    True)`` as a pure function of (seed, position), so resume stays exact.

    Epoch ``e`` takes its seeded permutation, splits it into multimodal and text-only items
    (permutation order kept) and cuts each into *mega-batches* of one global batch (LLaVA: world
    size x gradient accumulation x micro-batch). The mega-batches of both modalities are shuffled
    together (seeded) and laid on step boundaries: every optimizer step, and so every micro-batch
    and every packed row, holds one modality. Inside a mega-batch items are sorted by length
    (spliced tokens, longest first) and dealt to the ranks in units of ``unit`` samples (a
    micro-batch; 1 with packing) in snake order, so each micro-batch holds similar lengths and
    ranks get similar totals. The two partial mega-batches close the epoch, multimodal then
    text-only (LLaVA's mixed "additional batch"); an epoch that does not start on a step
    boundary first completes the previous epoch's last step with text-only items.

    Each epoch's positions are a permutation of its items (every sample once per epoch). Where
    the partial multimodal mega-batch ends inside a micro-batch, that one micro-batch holds both
    modalities: at most one per epoch (when each modality has at least a global batch of
    items), none when the multimodal count is a multiple of ``unit``. Exact homogeneity with
    every sample once per epoch is impossible in general (one multimodal and one text sample,
    micro-batch 2). Set membership of a step depends on (seed, epoch, global batch) only; the
    dealing also on ``unit`` and ``dp_size``, so resuming at another DP size changes only the
    arrangement inside the remaining steps.
    """

    def __init__(self, lengths, multimodal, seed: int, global_batch_size: int, unit: int,
                 dp_size: int) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.multimodal = np.asarray(multimodal, dtype=bool)
        if self.lengths.shape != self.multimodal.shape or self.lengths.ndim != 1:
            raise ValueError("lengths and multimodal must be 1-D of equal length")
        if global_batch_size % (unit * dp_size):
            raise ValueError(f"global batch {global_batch_size} is not a multiple of "
                             f"unit {unit} x dp {dp_size}")
        self.seed, self.global_batch_size, self.unit, self.dp_size = (
            seed, global_batch_size, unit, dp_size)
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self):  # loader workers rebuild their own epoch cache
        return {**self.__dict__, "_cache": {}}

    def item(self, position: int) -> int:
        """The dataset item (index into the train split) at global ``position``."""
        epoch, offset = divmod(position, len(self))
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = self.epoch_order(epoch)
        return int(self._cache[epoch][offset])

    def epoch_order(self, epoch: int) -> np.ndarray:
        n, g = len(self), self.global_batch_size
        perm = epoch_permutation(n, self.seed, epoch)
        mm, text = perm[self.multimodal[perm]], perm[~self.multimodal[perm]]
        head_size = min((-epoch * n) % g, n)  # completes the step the last epoch started
        head = [self._longest_first(text[:head_size]),
                self._longest_first(mm[:max(0, head_size - len(text))])]
        mm, text = mm[max(0, head_size - len(text)):], text[head_size:]
        full = [mm[i:i + g] for i in range(0, len(mm) - g + 1, g)] + \
               [text[i:i + g] for i in range(0, len(text) - g + 1, g)]
        shuffled = np.random.default_rng([self.seed, epoch, 1]).permutation(len(full))
        parts = head + [self._deal(self._longest_first(full[i])) for i in shuffled]
        parts += [self._longest_first(mm[len(mm) - len(mm) % g:]),
                  self._longest_first(text[len(text) - len(text) % g:])]
        order = np.concatenate(parts)
        assert len(order) == n
        return order

    def _longest_first(self, items: np.ndarray) -> np.ndarray:
        return items[np.argsort(-self.lengths[items], kind="stable")]

    def _deal(self, megabatch: np.ndarray) -> np.ndarray:
        """Units of ``unit`` consecutive (similar-length) items dealt to ranks in snake order;
        rank r's units form the r-th slice of the step, as ``rank_positions`` reads it."""
        units = megabatch.reshape(-1, self.unit)
        ranks: List[list] = [[] for _ in range(self.dp_size)]
        for j, u in enumerate(units):
            lap, pos = divmod(j, self.dp_size)
            ranks[pos if lap % 2 == 0 else self.dp_size - 1 - pos].append(u)
        return np.concatenate([np.concatenate(r) for r in ranks])

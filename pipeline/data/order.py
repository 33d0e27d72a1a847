"""Which sample each data-parallel rank reads at each step: pure functions of (seed, position).

The global order is fixed by the seed alone, so a run restarted from a checkpoint's
consumed-sample count reads exactly the samples the uninterrupted run would have read, and
ranks never need to talk to each other about data.

Global batch ``b`` holds global positions ``[b*G, (b+1)*G)``; DP rank ``r`` owns the
contiguous slice ``[b*G + r*G/D, b*G + (r+1)*G/D)``, cut into micro-batches of ``m``.
A global position ``g`` maps to epoch ``g // N`` and to ``perm_epoch[g % N]``.
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

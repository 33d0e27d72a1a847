"""Sequence packing as pure functions: which samples share a row, and the per-position facts the
model needs to keep packed samples apart.

Padding every spliced sample to ``seq_length`` wastes most of a step on short data (a stage-1
sample is 576 image positions + ~30 caption tokens of 2048). Packing places whole samples one
after another in rows of ``seq_length`` positions and describes the documents of a micro-batch
by cumulative lengths (``cu_seqlens``, megatron's ``PackedSeqParams`` with the ``thd`` layout), so
that

* attention is causal within each document and never crosses documents,
* RoPE positions restart at 0 for every document (megatron's thd rotary path),
* a next-token target never pairs the last position of one sample with the first of the next
  (``next_token_targets``), and the visual-word KL of an image position at a sample's start has
  no predecessor, exactly as in an unpacked row (``document_positions``).

The free tail of each row is one padding document (its positions carry IGNORE labels and no
image), so ``cu_seqlens`` always covers the whole micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_vwlmm.model.config import IGNORE_INDEX


@dataclass
class PackedSequence:
    """Document boundaries of one packed micro-batch (flattened to one sequence of ``total``).

    ``cu_seqlens``: int32 [num_documents + 1], 0 first and ``total`` last; ``max_seqlen``: the
    longest document. Padding documents are included, so boundaries tile the whole sequence.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def total(self) -> int:
        return int(self.cu_seqlens[-1])

    def to(self, device) -> "PackedSequence":
        return PackedSequence(self.cu_seqlens.to(device), self.max_seqlen)

    def packed_seq_params(self):
        """megatron-core's description of the same layout (attention and rotary read it)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens,
                               cu_seqlens_kv=self.cu_seqlens, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen)


def pack_rows(lengths: Sequence[int], row_length: int,
              names: Optional[Sequence[str]] = None) -> List[List[int]]:
    """Assign samples to rows of ``row_length`` positions: first-fit decreasing.

    Deterministic (ties keep input order) and a function of the lengths alone, so a resumed run
    packs a step exactly as the uninterrupted run did. Returns, per row, the indices of its
    samples in input order; rows are ordered by their first sample. A sample longer than a row
    is an error that names it (samples are never split).
    """
    for i, n in enumerate(lengths):
        if n > row_length:
            name = names[i] if names is not None else f"#{i}"
            raise ValueError(f"sample {name}: {n} positions after splicing exceed the row length "
                             f"(seq_length) {row_length}; packing never splits a sample")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    free: List[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_length - lengths[i])
    rows = [sorted(r) for r in rows]
    return sorted(rows, key=lambda r: r[0])


def document_ids(cu_seqlens: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """Index of the document each of ``total`` positions belongs to, [total] int64
    (``total`` defaults to ``cu_seqlens[-1]``, read on the host).

    Positions at or after ``cu_seqlens[-1]`` get id ``n``, one more document, so they never
    count as part of a real one."""
    boundaries = cu_seqlens[1:].contiguous()
    total = int(cu_seqlens[-1]) if total is None else total
    positions = torch.arange(total, device=boundaries.device, dtype=boundaries.dtype)
    return torch.searchsorted(boundaries, positions, right=True)


def document_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Position of every flattened position inside its own document, [total] int64."""
    ids = document_ids(cu_seqlens)
    return torch.arange(ids.shape[0], device=cu_seqlens.device) - cu_seqlens.to(torch.int64)[ids]


def next_token_targets(labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """Targets of next-token prediction: ``labels`` shifted left by one, IGNORE where there is
    no next position of the same sample (the row's end, and with packing every document end).

    labels: [B, T]; with ``cu_seqlens`` B is 1 and T is the packed length.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].to(torch.int64) - 1
        targets[0, ends] = IGNORE_INDEX
    return targets

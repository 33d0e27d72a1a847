"""A micro-batch as the model consumes it, and the collations that build it (padded rows, or
rows packed with whole samples: ``megatron_vwlmm/model/packing.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron_vwlmm.model.config import IGNORE_INDEX, IMAGE_TOKEN_ID
from megatron_vwlmm.model.packing import (PackedSequence, document_positions, next_token_targets,
                                          pack_rows)
from megatron_vwlmm.model.splicing import splice_layout


@dataclass
class VWLMMBatch:
    """Spliced layout of one micro-batch.

    tokens [B, T] int64 (image positions hold the pad id), labels [B, T] int64 aligned with
    tokens (IGNORE_INDEX where unsupervised; the loss shifts them), image_token_mask [B, T] bool,
    images [N, 3, H, W] float (normalised with the encoder kind's mean/std), in the order of
    the mask's image runs.
    sample_lengths [num_samples] int64: spliced positions of each sample (the useful work; the
    rest of the B x T positions is padding). ``packing``: None for padded rows (one sample per
    row); for packed rows B is 1, T is rows x seq_length, and it holds the document boundaries.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    image_token_mask: torch.Tensor
    images: torch.Tensor
    sample_lengths: Optional[torch.Tensor] = None
    packing: Optional[PackedSequence] = None

    def to(self, device: Any) -> "VWLMMBatch":
        return VWLMMBatch(
            tokens=self.tokens.to(device), labels=self.labels.to(device),
            image_token_mask=self.image_token_mask.to(device), images=self.images.to(device),
            sample_lengths=self.sample_lengths,  # host-side bookkeeping
            packing=self.packing.to(device) if self.packing is not None else None)

    @property
    def cu_seqlens(self) -> Optional[torch.Tensor]:
        return self.packing.cu_seqlens if self.packing is not None else None

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.sample_lengths.shape[0])

    @property
    def num_positions(self) -> int:
        """Positions the model computes (padding included)."""
        return int(self.tokens.numel())

    @property
    def num_useful_positions(self) -> int:
        return int(self.sample_lengths.sum())

    @property
    def num_lm_tokens(self) -> int:
        """Supervised next-token targets (the LM loss's denominator)."""
        return int((next_token_targets(self.labels.cpu(), self._cpu_cu_seqlens()) != IGNORE_INDEX)
                   .sum())

    @property
    def num_vm_positions(self) -> int:
        """Image positions with a predecessor in their own sample (the KL's denominator)."""
        mask = self.image_token_mask.cpu()
        if self.packing is None:
            return int(mask[:, 1:].sum())
        local = document_positions(self._cpu_cu_seqlens())
        return int((mask[0] & (local >= 1)).sum())

    def _cpu_cu_seqlens(self) -> Optional[torch.Tensor]:
        return self.packing.cu_seqlens.cpu() if self.packing is not None else None


def collate_samples(
    samples: Sequence[Mapping[str, Any]],
    *,
    seq_length: int,
    num_patches: int,
    pad_token_id: int,
    image_token_id: int = IMAGE_TOKEN_ID,
    image_shape: tuple[int, int, int] | None = None,
) -> VWLMMBatch:
    """Splice and right-pad samples to ``seq_length`` (fixed, so pipeline shapes are static).

    Each sample holds ``input_ids`` and ``labels`` (placeholders included) and ``images`` (a
    list of [3, H, W] tensors, one per placeholder). ``image_shape`` gives the image tensor
    shape for batches that happen to have no image at all.
    """
    tokens, labels, masks, images, lengths = [], [], [], [], []
    for index, sample in enumerate(samples):
        name = sample.get("key", f"#{index}")
        sample_images = list(sample.get("images") or [])
        placeholders = len(sample_images)
        tok, lab, mask = _splice(sample, index, num_patches, image_token_id, pad_token_id)
        if tok.shape[0] > seq_length:
            raise ValueError(
                f"sample {name}: {tok.shape[0]} positions after splicing {placeholders} image(s) "
                f"x {num_patches} patches exceed seq_length {seq_length}"
            )
        lengths.append(tok.shape[0])
        pad = seq_length - tok.shape[0]
        tokens.append(np.pad(tok, (0, pad), constant_values=pad_token_id))
        labels.append(np.pad(lab, (0, pad), constant_values=IGNORE_INDEX))
        masks.append(np.pad(mask, (0, pad), constant_values=False))
        images.extend(torch.as_tensor(img, dtype=torch.float32) for img in sample_images)
    return VWLMMBatch(
        tokens=torch.from_numpy(np.stack(tokens)),
        labels=torch.from_numpy(np.stack(labels)),
        image_token_mask=torch.from_numpy(np.stack(masks)),
        images=_stack_images(images, image_shape),
        sample_lengths=torch.tensor(lengths, dtype=torch.int64),
    )


def collate_packed(
    samples: Sequence[Mapping[str, Any]],
    *,
    seq_length: int,
    rows_per_micro_batch: int,
    num_patches: int,
    pad_token_id: int,
    image_token_id: int = IMAGE_TOKEN_ID,
    image_shape: tuple[int, int, int] | None = None,
) -> tuple[List[VWLMMBatch], List[List[int]]]:
    """Pack whole samples into rows of ``seq_length`` (``packing.pack_rows``) and group the rows
    into micro-batches of ``rows_per_micro_batch`` rows, each flattened to one packed sequence
    of ``rows_per_micro_batch x seq_length`` positions (static, so pipeline shapes agree; a short
    last micro-batch is filled with empty rows).

    Returns the micro-batches and, per micro-batch, the indices of its samples in ``samples``.
    """
    spliced = [_splice(s, i, num_patches, image_token_id, pad_token_id)
               for i, s in enumerate(samples)]
    names = [str(s.get("key", f"#{i}")) for i, s in enumerate(samples)]
    rows = pack_rows([t.shape[0] for t, _, _ in spliced], seq_length, names)
    batches, members = [], []
    for first in range(0, len(rows), rows_per_micro_batch):
        group = rows[first:first + rows_per_micro_batch]
        group += [[] for _ in range(rows_per_micro_batch - len(group))]
        tokens, labels, masks, images, lengths, bounds = [], [], [], [], [], [0]
        for row in group:
            used = 0
            for i in row:
                tok, lab, mask = spliced[i]
                tokens.append(tok)
                labels.append(lab)
                masks.append(mask)
                images.extend(torch.as_tensor(img, dtype=torch.float32)
                              for img in samples[i].get("images") or [])
                lengths.append(tok.shape[0])
                used += tok.shape[0]
                bounds.append(bounds[-1] + tok.shape[0])
            if used < seq_length:  # the row's free tail: one padding document
                pad = seq_length - used
                tokens.append(np.full(pad, pad_token_id, dtype=np.int64))
                labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
                masks.append(np.zeros(pad, dtype=bool))
                bounds.append(bounds[-1] + pad)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        batches.append(VWLMMBatch(
            tokens=torch.from_numpy(np.concatenate(tokens))[None],
            labels=torch.from_numpy(np.concatenate(labels))[None],
            image_token_mask=torch.from_numpy(np.concatenate(masks))[None],
            images=_stack_images(images, image_shape),
            sample_lengths=torch.tensor(lengths, dtype=torch.int64),
            packing=PackedSequence(cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())),
        ))
        members.append([i for row in group for i in row])
    return batches, members


def _splice(sample: Mapping[str, Any], index: int, num_patches: int, image_token_id: int,
            pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample's spliced (tokens, labels, image mask), its images checked against its
    placeholders."""
    ids = np.asarray(sample["input_ids"])
    placeholders = int((ids == image_token_id).sum())
    count = len(sample.get("images") or [])
    if placeholders != count:
        name = sample.get("key", f"#{index}")
        raise ValueError(f"sample {name}: {placeholders} image placeholders but {count} images")
    return splice_layout(ids, sample["labels"], num_patches=num_patches,
                         image_token_id=image_token_id, pad_token_id=pad_token_id)


def _stack_images(images: list, image_shape: tuple[int, int, int] | None) -> torch.Tensor:
    if images:
        return torch.stack(images)
    return torch.zeros((0, *(image_shape or (3, 1, 1))), dtype=torch.float32)

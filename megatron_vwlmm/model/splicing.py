"""Image-token splicing as pure functions (no distributed state; unit-testable).

LLaVA splices image features into the embedded sequence inside the model, which makes the
sequence length data dependent. Here the *layout* is computed at collation time instead: every
``<image>`` placeholder becomes ``num_patches`` positions flagged in ``image_token_mask``. The
sequence length is then known before the forward pass, which pipeline parallelism needs (every
stage must agree on activation shapes), and the model only scatters features into the flagged
rows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from megatron_vwlmm.model.config import IGNORE_INDEX


def splice_layout(
    input_ids: Sequence[int],
    labels: Sequence[int],
    *,
    num_patches: int,
    image_token_id: int,
    pad_token_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expand each placeholder into ``num_patches`` image positions.

    Returns ``(tokens, labels, image_token_mask)`` of the spliced length; image positions carry
    ``pad_token_id`` as token (never embedded: their rows are replaced) and IGNORE_INDEX labels.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    if ids.shape != lab.shape:
        raise ValueError(f"input_ids has {ids.shape[0]} tokens but labels has {lab.shape[0]}")
    is_image = ids == image_token_id
    repeats = np.where(is_image, num_patches, 1)
    tokens = np.repeat(np.where(is_image, pad_token_id, ids), repeats)
    spliced_labels = np.repeat(np.where(is_image, IGNORE_INDEX, lab), repeats)
    mask = np.repeat(is_image, repeats)
    return tokens, spliced_labels, mask


def scatter_image_features(
    token_embeddings: torch.Tensor, image_token_mask: torch.Tensor, image_features: torch.Tensor
) -> torch.Tensor:
    """Put image features into the flagged rows of the embedded sequence (differentiable).

    token_embeddings: [S, B, h] (megatron's layout); image_token_mask: [B, S];
    image_features: [num_image_positions, h] in batch-major order (sample by sample, image by
    image, patch by patch), which is the row-major order of ``image_token_mask``.
    """
    batch_major = token_embeddings.transpose(0, 1)
    index = image_token_mask.nonzero(as_tuple=True)
    if index[0].numel() != image_features.shape[0]:
        raise ValueError(
            f"{index[0].numel()} image positions in the batch but {image_features.shape[0]} "
            "image feature rows"
        )
    spliced = batch_major.index_put(index, image_features.to(batch_major.dtype))
    return spliced.transpose(0, 1).contiguous()


def visual_word_positions(
    image_token_mask: torch.Tensor, sample_positions: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target positions of the visual-word KL: image positions t with a predecessor t - 1 in
    their own sample, batch-major.

    ``sample_positions`` [B, T]: each position's offset inside its sample (packed rows hold
    several samples; ``packing.document_positions``); None means one sample per row, offset = t.
    Returns ``keep``, a bool mask over the batch's image positions (batch-major order, the
    order of the VM logits rows) selecting those targets, and ``(batch_index, t - 1)``: the
    rows whose next-token distribution is compared with the visual word at t.
    """
    batch_index, position = image_token_mask.nonzero(as_tuple=True)
    offset = position if sample_positions is None else sample_positions[batch_index, position]
    keep = offset >= 1
    return keep, (batch_index[keep], position[keep] - 1)

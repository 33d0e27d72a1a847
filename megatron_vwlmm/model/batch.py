"""A micro-batch as the model consumes it, and the collation that builds it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from megatron_vwlmm.model.config import IGNORE_INDEX, IMAGE_TOKEN_ID
from megatron_vwlmm.model.splicing import splice_layout


@dataclass
class VWLMMBatch:
    """Spliced layout of one micro-batch.

    tokens [B, T] int64 (image positions hold the pad id), labels [B, T] int64 aligned with
    tokens (IGNORE_INDEX where unsupervised; the loss shifts them), image_token_mask [B, T] bool,
    images [N, 3, H, W] float (CLIP-normalised), in the order of the mask's image runs.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    image_token_mask: torch.Tensor
    images: torch.Tensor

    def to(self, device: Any) -> "VWLMMBatch":
        return VWLMMBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_lm_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


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
    tokens, labels, masks, images = [], [], [], []
    for index, sample in enumerate(samples):
        name = sample.get("key", f"#{index}")
        sample_images = list(sample.get("images") or [])
        ids = np.asarray(sample["input_ids"])
        placeholders = int((ids == image_token_id).sum())
        if placeholders != len(sample_images):
            raise ValueError(
                f"sample {name}: {placeholders} image placeholders but {len(sample_images)} images"
            )
        tok, lab, mask = splice_layout(
            ids, sample["labels"], num_patches=num_patches, image_token_id=image_token_id,
            pad_token_id=pad_token_id,
        )
        if tok.shape[0] > seq_length:
            raise ValueError(
                f"sample {name}: {tok.shape[0]} positions after splicing {placeholders} image(s) "
                f"x {num_patches} patches exceed seq_length {seq_length}"
            )
        pad = seq_length - tok.shape[0]
        tokens.append(np.pad(tok, (0, pad), constant_values=pad_token_id))
        labels.append(np.pad(lab, (0, pad), constant_values=IGNORE_INDEX))
        masks.append(np.pad(mask, (0, pad), constant_values=False))
        images.extend(torch.as_tensor(img, dtype=torch.float32) for img in sample_images)
    if images:
        image_tensor = torch.stack(images)
    else:
        image_tensor = torch.zeros((0, *(image_shape or (3, 1, 1))), dtype=torch.float32)
    return VWLMMBatch(
        tokens=torch.from_numpy(np.stack(tokens)),
        labels=torch.from_numpy(np.stack(labels)),
        image_token_mask=torch.from_numpy(np.stack(masks)),
        images=image_tensor,
    )

"""Turn a stored sample (either shard format) into the model's input dict.

Images are stored un-normalized JPEG RGB at the vision resolution; the trainer normalizes with
the mean/std of the vision encoder they were prepared for (the manifest's ``vision`` section,
``vwlmm_data/contract.py``), which the trainer has checked against the model's encoder.
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from vwlmm_data.contract import IGNORE_INDEX, IMAGE_TOKEN_ID, VisionInfo
from vwlmm_data.samples import BadSampleError


def decode_image(jpeg: bytes, image_size: int, where: str, vision: VisionInfo) -> torch.Tensor:
    """JPEG bytes -> float32 [3, H, W], normalized with ``vision``'s mean/std."""
    try:
        img = Image.open(io.BytesIO(jpeg))
        img = img.convert("RGB")
    except Exception as exc:
        raise BadSampleError(f"{where}: image is not a decodable JPEG ({exc})") from exc
    if img.size != (image_size, image_size):
        raise BadSampleError(f"{where}: image is {img.size[0]}x{img.size[1]}, expected "
                             f"{image_size}x{image_size} (manifest image_size)")
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(vision.image_mean).view(3, 1, 1)
    std = torch.tensor(vision.image_std).view(3, 1, 1)
    return (arr - mean) / std


def decode_sample(raw: Dict[str, Any], image_size: int, where: str,
                  vision: VisionInfo, vocab_size: Optional[int] = None) -> Dict[str, Any]:
    """``raw``: {key, input_ids, labels, images (list of JPEG bytes), num_images}.

    Returns {key, input_ids (int64), labels (int64), images (list of [3,H,W] tensors)}.
    With ``vocab_size``, every id must be a token of the vocabulary (or the image placeholder /
    ignored label): an id outside it would index past the embedding (TP=1) or be silently
    masked to a zero row by the vocab-parallel embedding (TP >= 2).
    """
    key = raw["key"]
    where = f"sample {key!r} in {where}"
    input_ids = np.asarray(raw["input_ids"], dtype=np.int64)
    labels = np.asarray(raw["labels"], dtype=np.int64)
    if input_ids.ndim != 1 or labels.shape != input_ids.shape:
        raise BadSampleError(f"{where}: input_ids {input_ids.shape} and labels {labels.shape} "
                             "must be 1-D of equal length")
    placeholders = int((input_ids == IMAGE_TOKEN_ID).sum())
    images: List[bytes] = list(raw["images"])
    if placeholders != len(images) or placeholders != int(raw.get("num_images", placeholders)):
        raise BadSampleError(f"{where}: {placeholders} image placeholders, {len(images)} images, "
                             f"num_images={raw.get('num_images')}; all three must agree")
    if (labels[input_ids == IMAGE_TOKEN_ID] != IGNORE_INDEX).any():
        raise BadSampleError(f"{where}: labels at image placeholders must be {IGNORE_INDEX}")
    if vocab_size is not None:
        for name, ids, allowed in (("input_ids", input_ids, IMAGE_TOKEN_ID),
                                   ("labels", labels, IGNORE_INDEX)):
            bad = ids[((ids < 0) | (ids >= vocab_size)) & (ids != allowed)]
            if bad.size:
                raise BadSampleError(
                    f"{where}: {name} holds {bad.size} id(s) outside the model's vocabulary "
                    f"[0, {vocab_size}) (e.g. {int(bad[0])}); the data was tokenized for "
                    "another vocabulary or is damaged")
    return {
        "key": key,
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "images": [decode_image(b, image_size, f"{where}, image {i}", vision)
                   for i, b in enumerate(images)],
    }

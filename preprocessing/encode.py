"""One raw record -> one tokenized sample, or a reject with its reason.

Checks run cheapest first (the source's own filters, template, length) so bad records never
cost an image decode.
"""

from __future__ import annotations

import numpy as np

from preprocessing.config import PreprocessConfig
from preprocessing.images import ImageReject, ImageSettings, process_image
from preprocessing.sources import RawRecord, get_source
from preprocessing.templates import TemplateError, tokenize
from vwlmm_data.contract import IGNORE_INDEX, IMAGE_TOKEN_ID
from vwlmm_data.encoders import get_encoder_kind
from vwlmm_data.samples import Sample


class Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def image_settings(cfg: PreprocessConfig) -> ImageSettings:
    return ImageSettings(size=cfg.image_size, mode=cfg.image_mode, jpeg_quality=cfg.jpeg_quality,
                         max_pixels=cfg.max_image_pixels, min_side=cfg.min_image_side,
                         max_aspect_ratio=cfg.max_aspect_ratio,
                         exif_transpose=cfg.exif_transpose, jpeg_draft=cfg.jpeg_draft,
                         pad_color=get_encoder_kind(cfg.vision_encoder).pad_color)


def text_tokenizer(cfg: PreprocessConfig, tokenizer):
    """What the template encodes with: ``tokenizer`` itself (the HF fast tokenizer), or the
    folder's SentencePiece model as LLaVA's slow tokenizer uses it."""
    if cfg.tokenizer_backend == "fast":
        return tokenizer
    from preprocessing.legacy_tokenizer import load_text_tokenizer

    return load_text_tokenizer(cfg.tokenizer, cfg.tokenizer_backend)


def _fit_length(ids: np.ndarray, labels: np.ndarray, n_img: int, cfg: PreprocessConfig):
    num_tokens = len(ids) + n_img * (cfg.num_patches - 1)
    if num_tokens <= cfg.max_seq_len:
        return ids, labels, num_tokens
    if cfg.overlong == "drop":
        raise Reject("too_long", f"{num_tokens} tokens > max_seq_len {cfg.max_seq_len}")
    keep = len(ids) - (num_tokens - cfg.max_seq_len)
    if int((ids[:keep] == IMAGE_TOKEN_ID).sum()) != n_img:
        raise Reject("too_long", f"truncating {num_tokens} tokens to {cfg.max_seq_len} cuts an image")
    ids, labels = ids[:keep], labels[:keep]
    if not (labels != IGNORE_INDEX).any():
        raise Reject("too_long", "no supervised token left after truncation")
    return ids, labels, cfg.max_seq_len


def encode(rec: RawRecord, cfg: PreprocessConfig, tokenizer) -> Sample:
    if rec.error is not None:
        raise Reject(*rec.error)
    try:
        meta = rec.meta_json()
    except (RecursionError, ValueError) as exc:  # nested too deeply / not serialisable
        raise Reject("bad_metadata", f"metadata cannot be stored: {type(exc).__name__}") from exc
    rejected = get_source(cfg.source).reject(rec, cfg)
    if rejected is not None:
        raise Reject(*rejected)
    try:
        # LLaVA reads <image> as a placeholder only in a record with an image
        tok = tokenize(cfg.template, rec.turns, text_tokenizer(cfg, tokenizer), cfg.plain_eos,
                       image_tags=bool(rec.images))
    except TemplateError as exc:
        raise Reject(exc.reason, exc.detail) from exc
    if tok.num_images != len(rec.images):
        raise Reject("image_tag_mismatch",
                     f"{tok.num_images} placeholder(s) for {len(rec.images)} image(s)")
    ids, labels, num_tokens = _fit_length(tok.input_ids, tok.labels, tok.num_images, cfg)
    settings = image_settings(cfg)
    images = []
    for i, data in enumerate(rec.images):
        try:
            images.append(process_image(data, settings))
        except ImageReject as exc:
            detail = exc.detail if len(rec.images) == 1 else f"image {i}: {exc.detail}"
            raise Reject(exc.reason, detail) from exc
    return Sample(key=rec.key, source_id=rec.source_id, images=images, input_ids=ids,
                  labels=labels, num_images=tok.num_images, num_tokens=num_tokens,
                  template=cfg.template, meta=meta)

"""Typed, validated configuration of one preprocessing job.

Fields split in two groups: *content* fields decide the bytes of the output (they are hashed into
the job fingerprint and recorded in the manifest), *runtime* fields only decide how fast or where
the job runs (worker count, Ray address) and are kept out of both, so that a 1-worker and an
N-worker run write byte-identical manifests.

The defaults reproduce LLaVA-1.5's data (its ``preprocess_plain`` / ``preprocess_v1``, its slow
tokenizer, ``expand2square`` + CLIP preprocessing); every deviation is a named field, recorded
in the manifest's ``config``: ``plain_eos``, ``image_mode`` other than the stage's,
``exif_transpose``, ``jpeg_draft``, ``tokenizer_backend="fast"``. ``overlong`` stays ``drop``
by default; ``truncate`` is LLaVA's behaviour (the README's stage commands pass it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from preprocessing.sources import canonical_name, get_source, option_owners, source_choices
from preprocessing.sources.base import DEFAULT_MAX_IMAGE_BYTES
from preprocessing.sources.options import build_options, option_names
from vwlmm_data.encoders import ENCODER_KINDS, get_encoder_kind
from vwlmm_data.storage import S3Options

TEMPLATES = ("plain", "vicuna_v1", "mistral")
OUTPUT_FORMATS = ("webdataset", "arrow", "both")
IMAGE_MODES = ("pad", "resize", "crop")
OVERLONG = ("drop", "truncate")
TOKENIZER_BACKENDS = ("auto", "sentencepiece", "fast")
# ``output`` is runtime too: the manifest lives in it, and moving a dataset must not change it.
RUNTIME_FIELDS = ("output", "num_workers", "ray_address", "overwrite", "s3_endpoint", "s3_region",
                  "progress", "plan_only", "dedup_partitions", "max_in_flight")


def _fail(name: str, value, why: str) -> None:
    raise ValueError(f"config field {name!r}={value!r}: {why}")


@dataclass
class PreprocessConfig:
    source: str
    inputs: list[str]
    tokenizer: str
    output: str
    template: str = "plain"
    # plain: end the caption with EOS instead of LLaVA's "\n" separator.
    plain_eos: bool = False
    # auto: the tokenizer folder's SentencePiece model when it has one (LLaVA's slow tokenizer,
    # preprocessing/legacy_tokenizer.py), else the fast tokenizer; resolved at construction.
    tokenizer_backend: str = "auto"
    image_root: str | None = None
    format: str = "webdataset"
    # The vision encoder the images are prepared for (vwlmm_data/encoders.py): its
    # mean colour pads images, its mean/std are recorded in the manifest for the trainer.
    vision_encoder: str = "clip"
    # Images: CLIP ViT-L/14-336 by default -> (336 / 14)^2 = 576 patch tokens per image.
    image_size: int = 336
    patch_size: int = 14
    # None: LLaVA-1.5's choice for the template, resolved at construction: crop (its "square":
    # CLIP resize + centre crop) for plain pretraining, pad (expand2square) for the chat stages.
    image_mode: str | None = None
    # Apply EXIF orientation (LLaVA's PIL.Image.open(...).convert("RGB") does not).
    exif_transpose: bool = False
    # Decode large JPEGs at a reduced DCT scale (faster; pixels no longer LLaVA's).
    jpeg_draft: bool = False
    jpeg_quality: int = 95
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold
    # Bytes read for one image file or one tar member at most; bigger ones are rejected
    # ("file_too_large") unread. 64 MiB is ~10x the largest photos of LAION / LLaVA data.
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    min_image_side: int = 10
    max_aspect_ratio: float | None = None
    # The source's own options (``Source.options``, ``preprocessing/sources/options.py``): an
    # instance, or a mapping of its fields (None: the defaults); an instance after construction.
    # Content fields, recorded in the manifest's config beside the fields above.
    source_options: Any = None
    # Sequences.
    max_seq_len: int = 2048
    overlong: str = "drop"
    samples_per_shard: int = 1000
    dedup: bool = True
    # Runtime only (see module docstring).
    num_workers: int | None = None
    ray_address: str | None = None
    # S3 location (None: boto3's resolution, e.g. AWS_ENDPOINT_URL_S3 / AWS_REGION); credentials
    # always come from the standard AWS chain of the machine that reads or writes.
    s3_endpoint: str | None = None
    s3_region: str | None = None
    overwrite: bool = False
    progress: bool = True
    # Stop after scan, dedup and plan (no image work): sizes a job; a later run continues from it.
    plan_only: bool = False
    # Partitions of the distributed dedup step (None: one per million records,
    # preprocessing/plan.py); the decisions are the same for any count.
    dedup_partitions: int | None = None
    # Ray tasks in flight at once (None: twice the workers): bounds what the scheduler, the
    # object store and the driver hold on jobs of millions of units.
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        try:
            self.source = canonical_name(self.source)
        except KeyError:
            _fail("source", self.source, f"must be one of {source_choices()}")
        if not self.inputs:
            _fail("inputs", self.inputs, "at least one input file, glob or s3:// URI is needed")
        source = get_source(self.source)
        if source.needs_image_root and not self.image_root:
            _fail("image_root", self.image_root, f"--source {self.source} needs --image-root")
        self.source_options = build_options(source, self.source_options, option_owners())
        clash = sorted(set(option_names(source)) & {f.name for f in dataclasses.fields(self)})
        if clash:
            _fail("source_options", clash, f"--source {self.source} options shadow config fields")
        if self.image_mode is None:
            self.image_mode = "crop" if self.template == "plain" else "pad"
        for name, allowed in (
            ("template", TEMPLATES), ("format", OUTPUT_FORMATS),
            ("image_mode", IMAGE_MODES), ("overlong", OVERLONG),
            ("tokenizer_backend", TOKENIZER_BACKENDS), ("vision_encoder", ENCODER_KINDS),
        ):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"must be one of {allowed}")
        grid_error = get_encoder_kind(self.vision_encoder).grid_error(self.image_size,
                                                                      self.patch_size)
        if grid_error is not None:
            _fail("image_size", self.image_size, f"{grid_error} ({self.vision_encoder} encoder)")
        if not 1 <= self.jpeg_quality <= 100:
            _fail("jpeg_quality", self.jpeg_quality, "must be in 1..100")
        for name in ("samples_per_shard", "max_seq_len", "max_image_pixels", "min_image_side",
                     "max_image_bytes"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        if self.max_seq_len <= self.num_patches:
            _fail("max_seq_len", self.max_seq_len,
                  f"must exceed the {self.num_patches} tokens of one image")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            _fail("max_aspect_ratio", self.max_aspect_ratio, "must be >= 1 (long side / short side)")
        for name in ("num_workers", "dedup_partitions", "max_in_flight"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        if self.plain_eos and self.template != "plain":
            _fail("plain_eos", self.plain_eos, f"only applies to template 'plain', not {self.template!r}")
        from preprocessing.legacy_tokenizer import SENTENCEPIECE_FILE, resolve_backend

        self.tokenizer_backend = resolve_backend(self.tokenizer_backend, self.tokenizer)
        if self.tokenizer_backend == "sentencepiece" and \
                not os.path.isfile(os.path.join(self.tokenizer, SENTENCEPIECE_FILE)):
            _fail("tokenizer_backend", self.tokenizer_backend,
                  f"{self.tokenizer} holds no {SENTENCEPIECE_FILE} (SentencePiece model)")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def s3(self) -> S3Options:
        return S3Options(endpoint_url=self.s3_endpoint, region=self.s3_region)

    @property
    def formats(self) -> tuple[str, ...]:
        return ("webdataset", "arrow") if self.format == "both" else (self.format,)

    def content_dict(self) -> dict:
        """Fields that decide the output bytes (recorded as the manifest's ``config``), the
        source's options among them as fields of their own."""
        d = dataclasses.asdict(self)
        for name in RUNTIME_FIELDS:
            d.pop(name)
        d.update(d.pop("source_options"))
        return d

    def fingerprint(self) -> str:
        blob = json.dumps(self.content_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

"""The data contract between preprocessing and training: constants, shard layout, manifest.

The trainer imports these names (``IMAGE_TOKEN_ID``, ``IGNORE_INDEX``, ``CLIP_MEAN``, ``CLIP_STD``,
``load_manifest``) so both sides of the contract live in one file and cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

# LLaVA's IMAGE_TOKEN_INDEX: a negative id can never collide with a real vocabulary entry, and
# the model replaces each one with the image's patch embeddings.
IMAGE_TOKEN_ID = -200
# PyTorch cross-entropy's default ignore_index; labels carry it wherever nothing is supervised.
IGNORE_INDEX = -100
# OpenAI CLIP normalisation; images are stored un-normalised (JPEG RGB) and the trainer applies it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
FORMATS = ("webdataset", "arrow")

# Arrow IPC *file* format (random access via memory map). Column order is part of the contract.
ARROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_id", pa.string()),
        ("images", pa.list_(pa.binary())),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_images", pa.int32()),
        ("num_tokens", pa.int32()),
        ("template", pa.string()),
        ("meta", pa.string()),
    ]
)


def shard_name(index: int, fmt: str) -> str:
    """``shard-000042.tar`` / ``shard-000042.arrow``: one name per input unit, never renumbered."""
    return f"shard-{index:06d}.{'tar' if fmt == 'webdataset' else 'arrow'}"


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: ``path`` is relative to the manifest's folder."""

    path: str
    format: str
    num_samples: int
    num_tokens: int


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str
    sha256: str
    vocab_size: int


@dataclass(frozen=True)
class Manifest:
    """Typed view of ``manifest.json``; ``raw`` keeps every field, including future ones."""

    format_version: int
    num_samples: int
    rejected: dict[str, int]
    shards: list[ShardInfo]
    tokenizer: TokenizerInfo
    template: str
    image_token_id: int
    ignore_index: int
    image_size: int
    image_mode: str
    num_patches_per_image: int
    max_seq_len: int
    statistics: dict[str, Any]
    config: dict[str, Any]
    vwlmm_version: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def shards_of(self, fmt: str) -> list[ShardInfo]:
        """Shards of one format (``webdataset`` or ``arrow``), in global sample order."""
        return [s for s in self.shards if s.format == fmt]

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "manifest") -> "Manifest":
        required = [
            "format_version", "num_samples", "rejected", "shards", "tokenizer", "template",
            "image_token_id", "ignore_index", "image_size", "image_mode",
            "num_patches_per_image", "max_seq_len", "config", "vwlmm_version",
        ]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{origin}: missing field(s) {missing}")
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"{origin}: format_version {data['format_version']} is not supported "
                f"(this code reads version {FORMAT_VERSION})"
            )
        try:
            shards = [ShardInfo(**s) for s in data["shards"]]
            tokenizer = TokenizerInfo(**data["tokenizer"])
        except TypeError as exc:
            raise ValueError(f"{origin}: malformed shard or tokenizer entry: {exc}") from exc
        for s in shards:
            if s.format not in FORMATS:
                raise ValueError(f"{origin}: shard {s.path!r} has unknown format {s.format!r}")
        return cls(
            format_version=data["format_version"],
            num_samples=int(data["num_samples"]),
            rejected=dict(data["rejected"]),
            shards=shards,
            tokenizer=tokenizer,
            template=data["template"],
            image_token_id=int(data["image_token_id"]),
            ignore_index=int(data["ignore_index"]),
            image_size=int(data["image_size"]),
            image_mode=data["image_mode"],
            num_patches_per_image=int(data["num_patches_per_image"]),
            max_seq_len=int(data["max_seq_len"]),
            statistics=dict(data.get("statistics", {})),
            config=dict(data["config"]),
            vwlmm_version=data["vwlmm_version"],
            raw=data,
        )


def load_manifest(path_or_uri: str) -> Manifest:
    """Read ``manifest.json`` from a local path or ``s3://`` URI (a folder or the file itself).

    S3 access uses boto3's standard configuration; set ``AWS_ENDPOINT_URL`` for S3-compatible
    stores.
    """
    from preprocessing import storage  # local import: keep the constants importable cheaply

    uri = str(path_or_uri)
    if not uri.endswith(".json"):
        uri = storage.join(uri, MANIFEST_NAME)
    try:
        data = json.loads(storage.read_bytes(uri))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no manifest at {uri}: is preprocessing finished?") from exc
    return Manifest.from_dict(data, origin=uri)

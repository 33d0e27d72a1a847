"""The data contract between preprocessing and training, defined once.

Preprocessing writes, and the trainer reads, exactly what this module describes: the special
token ids, the shard formats and names, the Arrow schema, and ``manifest.json`` as the typed
``Manifest``. Both sides use these same dataclasses (``Manifest.to_json`` writes what
``Manifest.from_json`` reads), so a field cannot be renamed on one side only. A manifest
written by a later version keeps the fields this code does not know: they are carried in
``extra`` and written back unchanged.

Images are stored un-normalised (JPEG RGB at the vision resolution); the manifest's ``vision``
section names the encoder the images were prepared for and the mean/std the trainer normalises
with, taken from the encoder table in ``vwlmm_data/encoders.py``. A manifest
without that section was written for CLIP, the only encoder that existed before it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa

from vwlmm_data.encoders import get_encoder_kind
from vwlmm_data.storage import S3Options, join, read_bytes, write_bytes

# LLaVA's IMAGE_TOKEN_INDEX: a negative id can never collide with a real vocabulary entry, and
# the model replaces each one with the image's patch embeddings.
IMAGE_TOKEN_ID = -200
# PyTorch cross-entropy's default ignore_index; labels carry it wherever nothing is supervised.
IGNORE_INDEX = -100

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
FORMATS = ("webdataset", "arrow")
# The encoder a manifest without a ``vision`` section was prepared for.
LEGACY_VISION_ENCODER = "clip"

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
    if fmt not in FORMATS:
        raise ValueError(f"shard format {fmt!r} is not one of {FORMATS}")
    return f"shard-{index:06d}.{'tar' if fmt == 'webdataset' else 'arrow'}"


def _split_fields(cls, data: Any, origin: str, what: str) -> tuple[dict, dict]:
    """(known fields, unknown fields) of ``data`` for dataclass ``cls``; names missing ones."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{origin}: {what} must be an object, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
    required = [f.name for f in dataclasses.fields(cls) if f.name != "extra"
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ValueError(f"{origin}: {what} is missing field(s) {missing}")
    return ({k: v for k, v in data.items() if k in names},
            {k: v for k, v in data.items() if k not in names})


def _to_json_value(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json_value(v) for k, v in value.items()}
    return value


class _Record:
    """Shared by the manifest's dataclasses: ``to_dict`` is the inverse of ``from_dict``."""

    extra: dict

    def to_dict(self) -> dict:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = _to_json_value(getattr(self, f.name))
        return out


def _extra() -> Any:
    """Fields of a later format this code does not know: kept, written back, never hashed."""
    return field(default_factory=dict, hash=False, repr=False)


@dataclass(frozen=True)
class ShardInfo(_Record):
    """One shard file. In the manifest ``path`` is relative to the manifest's folder;
    ``resolve(root)`` gives the same shard with ``path`` the local path or URL readers open."""

    path: str
    format: str
    num_samples: int
    num_tokens: int
    extra: dict = _extra()

    def resolve(self, root: str) -> "ShardInfo":
        return dataclasses.replace(self, path=join(root, self.path))

    @classmethod
    def from_dict(cls, data: Any, origin: str = "manifest") -> "ShardInfo":
        known, extra = _split_fields(cls, data, origin, "a shard entry")
        shard = cls(path=str(known["path"]), format=known["format"],
                    num_samples=int(known["num_samples"]), num_tokens=int(known["num_tokens"]),
                    extra=extra)
        if shard.format not in FORMATS:
            raise ValueError(f"{origin}: shard {shard.path!r} has unknown format {shard.format!r}")
        return shard


@dataclass(frozen=True)
class TokenizerInfo(_Record):
    """The tokenizer that produced ``input_ids``: a name or path, a hash of its files, its size."""

    name_or_path: str
    sha256: str
    vocab_size: int
    # the folder's flags as the encoding applied them (``legacy``, ``add_bos_token``, ...;
    # preprocessing/legacy_tokenizer.py); empty when unknown
    encoding: dict = field(default_factory=dict, hash=False)
    extra: dict = _extra()

    @classmethod
    def from_dict(cls, data: Any, origin: str = "manifest") -> "TokenizerInfo":
        known, extra = _split_fields(cls, data, origin, "tokenizer")
        return cls(name_or_path=known["name_or_path"], sha256=known["sha256"],
                   vocab_size=int(known["vocab_size"]), encoding=dict(known.get("encoding", {})),
                   extra=extra)


@dataclass(frozen=True)
class VisionInfo(_Record):
    """The vision encoder the images were prepared for and the normalisation the trainer
    applies to them (images are stored un-normalised)."""

    encoder: str
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    extra: dict = _extra()

    @classmethod
    def of(cls, encoder: str) -> "VisionInfo":
        """The entry of encoder kind ``encoder`` in ``vwlmm_data/encoders.py``."""
        kind = get_encoder_kind(encoder)
        return cls(encoder=kind.name, image_mean=tuple(kind.image_mean),
                   image_std=tuple(kind.image_std))

    @classmethod
    def from_dict(cls, data: Any, origin: str = "manifest") -> "VisionInfo":
        if data is None:
            return cls.of(LEGACY_VISION_ENCODER)
        known, extra = _split_fields(cls, data, origin, "vision")
        mean, std = tuple(map(float, known["image_mean"])), tuple(map(float, known["image_std"]))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{origin}: vision image_mean / image_std need 3 values (RGB)")
        return cls(encoder=known["encoder"], image_mean=mean, image_std=std, extra=extra)


@dataclass(frozen=True)
class Statistics(_Record):
    """Counts over the stored samples; ``max_tokens`` bounds the trainer's sequence length."""

    num_records: int  # input records read, rejected ones included
    num_tokens: int  # sum over samples, each image counting its patch tokens
    min_tokens: int | None  # None when no sample was kept
    max_tokens: int
    mean_tokens: float
    num_text_tokens: int  # tokens other than image placeholders
    num_supervised_tokens: int
    num_images: int
    num_text_only: int  # samples without an image
    # samples kept after an adjustment their source names in the record's meta "adjusted"
    # (e.g. preprocessing/sources/llava.py ADJUSTMENTS) -> count
    adjusted: dict = field(default_factory=dict, hash=False)
    extra: dict = _extra()

    @classmethod
    def from_dict(cls, data: Any, origin: str = "manifest") -> "Statistics":
        known, extra = _split_fields(cls, data, origin, "statistics")
        ints = {k: int(v) for k, v in known.items()
                if k not in ("min_tokens", "mean_tokens", "adjusted")}
        return cls(**ints, mean_tokens=float(known["mean_tokens"]),
                   adjusted={str(k): int(v) for k, v in known.get("adjusted", {}).items()},
                   min_tokens=None if known["min_tokens"] is None else int(known["min_tokens"]),
                   extra=extra)


@dataclass(frozen=True)
class Manifest(_Record):
    """``manifest.json``: what a finished dataset holds and how it was made (written last)."""

    format_version: int
    num_samples: int
    rejected: dict[str, int]  # reject reason -> count (details in rejects.jsonl)
    shards: tuple[ShardInfo, ...]  # in global sample order within each format
    statistics: Statistics
    tokenizer: TokenizerInfo
    template: str
    image_token_id: int
    ignore_index: int
    image_size: int
    image_mode: str
    num_patches_per_image: int
    max_seq_len: int
    formats: tuple[str, ...]
    config: dict[str, Any]  # the preprocessing config fields that decide the bytes
    vwlmm_version: str
    vision: VisionInfo = field(default_factory=lambda: VisionInfo.of(LEGACY_VISION_ENCODER))
    extra: dict = _extra()

    def shards_of(self, fmt: str) -> list[ShardInfo]:
        """Shards of one format (``webdataset`` or ``arrow``), in global sample order."""
        return [s for s in self.shards if s.format == fmt]

    def select_format(self, fmt: str) -> str:
        """``fmt`` if the dataset has shards of it; ``auto`` prefers Arrow (random access)."""
        present = {s.format for s in self.shards}
        if fmt == "auto":
            fmt = "arrow" if "arrow" in present else "webdataset"
        if fmt not in present:
            raise ValueError(f"the manifest lists no {fmt} shards (it has {sorted(present)})")
        return fmt

    @classmethod
    def from_dict(cls, data: Any, origin: str = "manifest") -> "Manifest":
        if isinstance(data, Mapping) and "format_version" in data and \
                data["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{origin}: format_version {data['format_version']} is not "
                             f"supported (this code reads version {FORMAT_VERSION})")
        known, extra = _split_fields(cls, data, origin, "the manifest")
        try:
            return cls(
                format_version=int(known["format_version"]),
                num_samples=int(known["num_samples"]),
                rejected={str(k): int(v) for k, v in known["rejected"].items()},
                shards=tuple(ShardInfo.from_dict(s, origin) for s in known["shards"]),
                statistics=Statistics.from_dict(known["statistics"], origin),
                tokenizer=TokenizerInfo.from_dict(known["tokenizer"], origin),
                template=known["template"],
                image_token_id=int(known["image_token_id"]),
                ignore_index=int(known["ignore_index"]),
                image_size=int(known["image_size"]),
                image_mode=known["image_mode"],
                num_patches_per_image=int(known["num_patches_per_image"]),
                max_seq_len=int(known["max_seq_len"]),
                formats=tuple(known["formats"]),
                config=dict(known["config"]),
                vwlmm_version=known["vwlmm_version"],
                vision=VisionInfo.from_dict(known.get("vision"), origin),
                extra=extra,
            )
        except (TypeError, AttributeError) as exc:  # a field of the wrong JSON type
            raise ValueError(f"{origin}: malformed manifest ({exc})") from exc

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, origin: str = "manifest") -> "Manifest":
        try:
            parsed = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{origin}: not valid JSON ({exc})") from exc
        return cls.from_dict(parsed, origin)


def manifest_uri(path_or_uri: str) -> str:
    """The manifest file of a dataset folder (or the file itself when given)."""
    uri = str(path_or_uri)
    return uri if uri.endswith(".json") else join(uri, MANIFEST_NAME)


def load_manifest(path_or_uri: str, s3: S3Options = S3Options()) -> Manifest:
    """Read ``manifest.json`` from a dataset folder or the file itself, local or ``s3://``."""
    uri = manifest_uri(path_or_uri)
    try:
        data = read_bytes(uri, s3)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no manifest at {uri}: is preprocessing finished?") from exc
    return Manifest.from_json(data, origin=uri)


def write_manifest(root: str, manifest: Manifest, s3: S3Options = S3Options()) -> None:
    """Commit ``manifest.json`` atomically; its presence means the dataset is complete."""
    write_bytes(join(root, MANIFEST_NAME), manifest.to_json(), s3)

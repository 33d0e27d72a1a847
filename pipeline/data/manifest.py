"""Read and check the preprocessing ``manifest.json`` (the data contract's single source of truth).

Uses ``preprocessing.schema.load_manifest`` when that package provides it, so both sides parse
the same way; otherwise reads the JSON and checks the fields the trainer relies on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List

from pipeline.config import ConfigError
from pipeline.data.storage import S3Options, join, read_bytes

IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
try:  # the contract's constants live in preprocessing/schema.py once it lands
    from preprocessing.schema import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, IMAGE_TOKEN_ID  # noqa: F401
except ImportError:
    pass

_REQUIRED = ("format_version", "num_samples", "shards", "tokenizer", "image_size")


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute path or s3:// URL
    format: str  # "arrow" | "webdataset"
    num_samples: int


def _as_dict(manifest: Any) -> Dict[str, Any]:
    if isinstance(manifest, dict):
        return manifest
    for attr in ("to_dict", "model_dump", "dict"):
        if hasattr(manifest, attr):
            return getattr(manifest, attr)()
    import dataclasses

    if dataclasses.is_dataclass(manifest):
        return dataclasses.asdict(manifest)
    raise TypeError(f"unsupported manifest object {type(manifest)}")


def load_manifest(root: str, opts: S3Options = S3Options()) -> Dict[str, Any]:
    """The manifest at ``<root>/manifest.json`` as a dict; raises naming the file on bad content."""
    url = join(root, "manifest.json")
    try:
        manifest = json.loads(read_bytes(url, opts))
    except FileNotFoundError as exc:
        raise ConfigError(f"data.path={root!r}: no manifest.json there ({exc}); point data.path "
                          "at the preprocessing output folder") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{url}: not valid JSON ({exc})") from exc
    try:  # one parser for both sides of the contract when preprocessing provides it
        from preprocessing.schema import Manifest
    except ImportError:
        Manifest = None
    if Manifest is not None:
        try:
            Manifest.from_dict(manifest, origin=url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ConfigError(f"{url}: missing field(s) {missing} required by the data contract")
    if manifest["format_version"] != 1:
        raise ConfigError(f"{url}: format_version {manifest['format_version']} is not supported "
                          "(this trainer reads version 1)")
    return manifest


def select_shards(manifest: Dict[str, Any], root: str, fmt: str) -> List[ShardInfo]:
    """The shards of one format; ``auto`` prefers Arrow (random access, global shuffle)."""
    formats = {s["format"] for s in manifest["shards"]}
    if fmt == "auto":
        fmt = "arrow" if "arrow" in formats else "webdataset"
    shards = [ShardInfo(join(root, s["path"]), s["format"], int(s["num_samples"]))
              for s in manifest["shards"] if s["format"] == fmt]
    if not shards:
        raise ConfigError(f"data.format={fmt!r}: {root}/manifest.json lists no {fmt} shards "
                          f"(it has {sorted(formats)})")
    return shards

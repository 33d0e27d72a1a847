"""Reading and writing Hugging Face weight folders (safetensors, sharded or not).

Reads are lazy (``safe_open`` per tensor) so an import holds one copy of the source at most;
writes go shard by shard through ``huggingface_hub``'s splitter, so an export materialises one
shard's contiguous copies at a time next to the model it converts from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional

import torch

from megatron_vwlmm.convert.errors import IncompleteCheckpointError
from vwlmm_data.storage import default_file_mode

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping over the tensors of an HF folder, loading each tensor on access."""

    def __init__(self, folder: Path, files: Dict[str, Path]):
        self.folder = folder
        self._files = files  # key -> file

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self._files:
            raise KeyError(f"{self.folder}: tensor {key!r} not found")
        with safe_open(str(self._files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _index_files(index: Path) -> Dict[str, Path]:
    """key -> shard file of a sharded checkpoint's index, every shard checked to exist and to
    lie inside the folder: an index naming ``../x``, an absolute path or a symlink that leads
    out would make an import read (and a later export republish) files of another folder."""
    weight_map = json.loads(index.read_text())["weight_map"]
    root = index.parent.resolve()
    outside = sorted({f for f in weight_map.values()
                      if not isinstance(f, str) or root not in (root / f).resolve().parents})
    if outside:
        raise IncompleteCheckpointError(f"{index} names shard files outside {index.parent}: "
                                        f"{outside}; refusing to read them")
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        raise IncompleteCheckpointError(f"{index} names missing shard files {missing}")
    return {k: index.parent / f for k, f in weight_map.items()}


def _load_bin(path: Path) -> Dict[str, torch.Tensor]:
    """A torch weights file, unpickled with ``weights_only`` (tensors and containers only:
    a pickle that would run code or build other objects is refused)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise IncompleteCheckpointError(f"{path}: not a readable torch weights file "
                                        f"({type(exc).__name__})") from exc
    if not isinstance(state, dict) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IncompleteCheckpointError(f"{path}: holds no name -> tensor mapping")
    return state


def read_hf_tensors(folder: str | Path) -> Mapping[str, torch.Tensor]:
    """All tensors of an HF model folder: ``model.safetensors``, a sharded safetensors index,
    or (older checkpoints) ``pytorch_model.bin`` / its sharded index.

    Only weight files are read, by name: transformers' Trainer leaves other pickles beside
    them (``training_args.bin``, ``optimizer.bin``, ``scheduler.bin``...).
    """
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    if (folder / SAFETENSORS_INDEX).is_file():
        return LazyTensors(folder, _index_files(folder / SAFETENSORS_INDEX))
    files = sorted(folder.glob("*.safetensors"))
    if files:
        keys: Dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                keys.update({k: path for k in f.keys()})
        return LazyTensors(folder, keys)
    if (folder / BIN_INDEX).is_file():
        bins = sorted(set(_index_files(folder / BIN_INDEX).values()))
    else:
        bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        state: Dict[str, torch.Tensor] = {}
        for path in bins:
            state.update(_load_bin(path))
        return state
    raise IncompleteCheckpointError(
        f"{folder}: no weights found (model.safetensors, {SAFETENSORS_INDEX}, "
        f"pytorch_model.bin or {BIN_INDEX})")


def read_tensor_file(path: str | Path) -> Dict[str, torch.Tensor]:
    """One weights file (.safetensors or a torch .bin/.pt), e.g. LLaVA's ``mm_projector.bin``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _load_bin(path)


def write_hf_tensors(state: Mapping[str, torch.Tensor], folder: str | Path, *,
                     dtype: Optional[torch.dtype] = None, max_shard_size: str = "5GB",
                     progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Save ``state`` as (sharded) safetensors with an index when there is more than one shard.

    Tensors are cast and made contiguous one shard at a time, so views into a live model (the
    export's source) cost memory only for the shard being written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(dict(state), max_shard_size=max_shard_size)
    total = len(split.filename_to_tensors)
    for done, (filename, keys) in enumerate(split.filename_to_tensors.items(), start=1):
        shard = {}
        for key in keys:
            tensor = state[key].detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            shard[key] = tensor.contiguous().cpu().clone()
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        # safetensors writes through a 0600 temp file; give the shard the mode open() would.
        os.chmod(folder / filename, default_file_mode())
        del shard
        if progress is not None:
            progress(done, total)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))

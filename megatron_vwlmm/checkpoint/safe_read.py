"""Reading a checkpoint folder before megatron does: complete, well-formed, and no code to run.

A torch_dist checkpoint holds two pickles. ``common.pt`` is read with torch's ``weights_only``
loader (plain containers and tensors only). ``.metadata`` (torch distributed checkpoint's
index) is unpickled by torch with the full pickle machinery, so a hostile file would run code
the moment any tool opens the folder; ``check_metadata`` unpickles it first with an allow-list
of the classes torch writes there (its checkpoint metadata dataclasses, ``torch.Size``, dtypes)
and refuses anything else, naming it. Every load (resume, ``model.init_from``, export, convert)
calls ``require_loadable`` first.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Dict

import torch

from megatron_vwlmm.checkpoint.layout import folder_iteration
from vwlmm_data.errors import Refusal

COMMON_FILE = "common.pt"
METADATA_FILE = ".metadata"
MEGATRON_FILE = "metadata.json"

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict")}


class CheckpointError(Refusal, RuntimeError):
    """A checkpoint folder cannot be loaded; the message names the file and what to do."""

    same_on_every_rank = True


class IncompleteCheckpoint(CheckpointError):
    """Files a complete torch_dist checkpoint has are missing (e.g. a save killed midway)."""


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (module, name) in _ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)) or (
            module in _DCP_MODULES and not name.startswith("__")
            and isinstance(getattr(__import__(module, fromlist=[name]), name, None), type))
        if not allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _what(folder: Path) -> str:
    it = folder_iteration(folder)
    return f"{folder}" + (f" (iteration {it})" if it is not None else "")


def check_metadata(folder: Path) -> None:
    """Unpickle ``.metadata`` with the allow-list; CheckpointError on anything else."""
    path = Path(folder) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            _AllowListUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        if "refused global" in str(exc):
            raise CheckpointError(
                f"{path}: holds objects a checkpoint index never contains ({exc}); it may be "
                "hostile and was not loaded. Load only checkpoints you or a trusted party "
                "wrote") from None
        raise CheckpointError(f"{path}: damaged ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise CheckpointError(f"{path}: damaged ({type(exc).__name__}: {exc})") from None


def read_common(folder: Path) -> Dict[str, Any]:
    """``common.pt`` through torch's ``weights_only`` loader."""
    path = Path(folder) / COMMON_FILE
    try:
        common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(common, dict):
        raise CheckpointError(f"{path}: not a checkpoint's common state")
    return common


def require_loadable(folder: Path) -> Dict[str, Any]:
    """Check every file megatron is about to read; return the common state.

    Raises CheckpointError naming the folder (and its iteration) and the missing or damaged
    file.
    """
    folder = Path(folder)
    missing = [n for n in (MEGATRON_FILE, COMMON_FILE, METADATA_FILE)
               if not (folder / n).is_file()]
    if not missing and not any(folder.glob("*.distcp")):
        missing = ["*.distcp"]
    if missing:
        raise IncompleteCheckpoint(f"{_what(folder)}: incomplete, missing {', '.join(missing)}")
    check_metadata(folder)
    return read_common(folder)

"""Megatron side of the conversions: one-process TP1PP1 model, dist-checkpoint save and load.

Conversions never shard by hand: a full (TP1PP1) model is saved with megatron's
``dist_checkpointing`` (torch_dist), whose tensors are stored by global shape and offsets, so the
trainer loads the same files into any TP/PP layout; an export loads any layout's checkpoint back
into a TP1PP1 model the same way.

An import folder is a dist checkpoint whose common state records the ``VWLMMConfig``, the layout
it was validated for and the provenance of its weights (``megatron_vwlmm/checkpoint/metadata.py``),
plus ``vwlmm_config.json`` (the same, for people) and, when the source vision tower is deeper
than the layers the encoder runs, ``vision_tail.safetensors`` (those layers + the final norm,
HF names) so exports carry the whole tower. Trainer checkpoints record the same and are found
through the same layout (``megatron_vwlmm/checkpoint/layout.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

import torch

from megatron_vwlmm.checkpoint import fingerprint
from megatron_vwlmm.checkpoint.layout import VISION_TAIL_FILE, find_checkpoint, write_file_atomic
from megatron_vwlmm.checkpoint.metadata import (
    CONFIG_KEY,
    PROVENANCE_KEY,
    Provenance,
    config_to_dict,
    model_config_of,
)
from megatron_vwlmm.checkpoint.safe_read import (CheckpointError, IncompleteCheckpoint,
                                                 require_loadable)
from megatron_vwlmm.convert.errors import IncompleteCheckpointError
from megatron_vwlmm.model.config import VWLMMConfig
from vwlmm_data.errors import last_line
from vwlmm_data.storage import default_file_mode

IMPORT_RECORD_FILE = "vwlmm_config.json"


# -- one-process megatron ----------------------------------------------------------------------------

@contextlib.contextmanager
def megatron_process() -> Iterator[None]:
    """Megatron parallel state for a one-process TP1PP1 job (the CLI), or the caller's own when
    it already runs a world of one (tests launched through ``run_on_ranks``)."""
    import torch.distributed as dist

    from megatron_vwlmm.parallel.initialize import destroy_distributed, initialize_distributed
    from megatron_vwlmm.parallel.launch import find_free_port

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("conversions run in one process; call them outside a multi-rank job")
        yield
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(find_free_port()))
    initialize_distributed(tp=1, pp=1)
    try:
        yield
    finally:
        destroy_distributed()


def full_model(config: VWLMMConfig):
    """A TP1PP1 ``VWLMMModel`` with megatron's local layers (any checkpoint loads into it: TE's
    fused-norm names are mapped by the model's sharded state)."""
    from megatron_vwlmm.model import build_model, replace

    return build_model(replace(config, transformer_impl="local", fp8=None))


def model_state(model) -> Dict[str, torch.Tensor]:
    """The model's tensors by name (megatron's ``_extra_state`` entries dropped)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


# -- save ------------------------------------------------------------------------------------------

def import_provenance(out: Path, source: Mapping[str, Any], has_vision_tail: bool) -> Provenance:
    """The provenance an import records: itself, its source record, the source's tokenizer."""
    from megatron_vwlmm.convert.processor import find_tokenizer_dir

    tokenizer = find_tokenizer_dir(source.get("llm"), source.get("vwlmm"))
    out = out.resolve()
    return Provenance(import_dir=str(out), conversion=dict(source),
                      tokenizer=str(tokenizer.resolve()) if tokenizer else None,
                      vision_tail=str(out / VISION_TAIL_FILE) if has_vision_tail else None)


def save_checkpoint(model, config: VWLMMConfig, out_dir: str | Path, *, layout: Dict[str, int],
                    source: Dict[str, Any], vision_tail: Optional[Mapping[str, torch.Tensor]] = None
                    ) -> Path:
    """Write ``model`` (TP1PP1) as a reshardable torch_dist checkpoint with its metadata."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output directory exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    provenance = import_provenance(out, source, bool(vision_tail))
    model_sd = model.sharded_state_dict()
    prints = fingerprint.fingerprint([model_sd])
    sharded = {
        "model": model_sd,
        CONFIG_KEY: config_to_dict(config),
        "layout": dict(layout),
        PROVENANCE_KEY: provenance.to_dict(),
    }
    dist_checkpointing.save(sharded, str(out), sharded_strategy=("torch_dist", 1))
    fingerprint.write(out, prints)
    if vision_tail:
        save_file({k: v.contiguous() for k, v in vision_tail.items()}, str(out / VISION_TAIL_FILE))
        os.chmod(out / VISION_TAIL_FILE, default_file_mode())  # safetensors writes 0600
    record = {CONFIG_KEY: config_to_dict(config), "layout": dict(layout),
              PROVENANCE_KEY: provenance.to_dict()}
    write_file_atomic(out / IMPORT_RECORD_FILE, json.dumps(record, indent=2, default=str).encode())
    return out


# -- locate and load -------------------------------------------------------------------------------

@dataclass
class CheckpointSource:
    """A megatron checkpoint ready to load: where its tensors are, its model config and where
    its weights came from."""

    path: Path
    config: VWLMMConfig
    provenance: Provenance
    common: Mapping[str, Any]  # the checkpoint's common state (read once, safely)

    @property
    def conversion(self) -> Dict[str, Any]:
        """The source record of the import the weights descend from (empty: from scratch)."""
        return self.provenance.conversion

    def vision_tail(self) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            tail = self.provenance.vision_tail_file(self.path)
        except FileNotFoundError as exc:
            raise IncompleteCheckpointError(str(exc)) from exc
        return load_file(str(tail)) if tail is not None else {}


def resolve_checkpoint(path: str | Path) -> CheckpointSource:
    """Find the dist checkpoint under ``path``: an import directory, one trainer ``iter_*``
    checkpoint, a trainer checkpoint root (follows ``latest``) or a run directory."""
    try:
        path = find_checkpoint(Path(path))
    except FileNotFoundError as exc:
        raise IncompleteCheckpointError(str(exc)) from exc
    try:
        common = require_loadable(path)
    except IncompleteCheckpoint as exc:
        raise IncompleteCheckpointError(
            f"not a complete megatron dist checkpoint: {exc}; pass the output of `vwlmm-convert "
            "import` or a trainer checkpoint folder (its `latest` marker or an iter_* folder). "
            "A save killed midway leaves an *.tmp folder, which is never complete.") from None
    except CheckpointError as exc:
        raise IncompleteCheckpointError(str(exc)) from None
    where = f"{path}/common.pt"
    try:
        config = model_config_of(common, where)
    except ValueError as exc:
        raise IncompleteCheckpointError(str(exc)) from exc
    return CheckpointSource(path=path, config=config, provenance=Provenance.of(common, where),
                            common=common)


def load_checkpoint(source: CheckpointSource):
    """A TP1PP1 model holding the checkpoint's weights (whatever layout saved them)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    model = full_model(source.config)
    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(source.path))
    except CheckpointingException as exc:
        raise IncompleteCheckpointError(
            f"{source.path}: the checkpoint does not hold every tensor of the model its config "
            f"describes ({exc})") from exc
    except CheckpointException as exc:
        raise IncompleteCheckpointError(
            f"{source.path}: a tensor file is damaged ({last_line(exc)})") from exc
    model.load_state_dict(loaded["model"])
    try:
        fingerprint.verify(source.path, fingerprint.fingerprint([model.sharded_state_dict()]),
                           [fingerprint.MODEL])
    except fingerprint.FingerprintMismatch as exc:
        raise IncompleteCheckpointError(str(exc)) from None
    return model

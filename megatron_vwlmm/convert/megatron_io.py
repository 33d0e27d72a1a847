"""Megatron side of the conversions: one-process TP1PP1 model, dist-checkpoint save and load.

Conversions never shard by hand: a full (TP1PP1) model is saved with megatron's
``dist_checkpointing`` (torch_dist), whose tensors are stored by global shape and offsets, so the
trainer loads the same files into any TP/PP layout; an export loads any layout's checkpoint back
into a TP1PP1 model the same way.

An import directory is a dist checkpoint plus ``vwlmm_config.json`` (the ``VWLMMConfig``, the
layout it was validated for and where the weights came from) and, when the source CLIP is deeper
than the layers the encoder runs, ``vision_tail.safetensors`` (those layers + post-layernorm,
HF names) so exports carry the whole tower. The trainer's checkpoints (``pipeline/checkpoint.py``:
``<root>/latest`` -> ``iter_NNNNNNN/``, run config in the common state) are read too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

import torch

from megatron_vwlmm.convert.errors import IncompleteCheckpointError
from megatron_vwlmm.model.config import DecoderConfig, VisionConfig, VWLMMConfig, get_preset

CONFIG_FILE = "vwlmm_config.json"
VISION_TAIL_FILE = "vision_tail.safetensors"
LATEST = "latest"


# -- config (de)serialisation --------------------------------------------------------------------

def config_to_dict(config: VWLMMConfig) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> VWLMMConfig:
    """Inverse of ``config_to_dict``; unknown or missing fields are named in the error."""
    raw = dict(raw)
    try:
        decoder = DecoderConfig(**raw.pop("decoder"))
        vision = VisionConfig(**raw.pop("vision"))
        return VWLMMConfig(decoder=decoder, vision=vision, **raw)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{source}: not a VWLMMConfig ({exc})") from exc


def trainer_model_config(train_config: Mapping[str, Any]) -> VWLMMConfig:
    """The model config of a trainer checkpoint's run config (``pipeline.config.TrainConfig``
    as a dict): preset + vision preset + overrides + precision, as the trainer builds it."""
    model = train_config["model"]
    changes = dict(model.get("overrides") or {})
    precision = train_config.get("precision") or {}
    changes.setdefault("bf16", precision.get("bf16", False))
    changes.setdefault("fp8", precision.get("fp8"))
    return get_preset(model["preset"], vision=model.get("vision"), **changes)


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
    sharded = {
        "model": model.sharded_state_dict(),
        "vwlmm_config": config_to_dict(config),
        "layout": dict(layout),
        "conversion": dict(source),
    }
    dist_checkpointing.save(sharded, str(out), sharded_strategy=("torch_dist", 1))
    if vision_tail:
        save_file({k: v.contiguous() for k, v in vision_tail.items()}, str(out / VISION_TAIL_FILE))
    meta = {"vwlmm_config": config_to_dict(config), "layout": dict(layout), "source": source}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return out


# -- locate and load -------------------------------------------------------------------------------

@dataclass
class CheckpointSource:
    """A megatron checkpoint ready to load: where its tensors are, its model config, and the
    import directory (if any) whose side files (vision tail, HF source configs) apply to it."""

    path: Path
    config: VWLMMConfig
    conversion: Dict[str, Any] = field(default_factory=dict)
    import_dir: Optional[Path] = None

    def vision_tail(self) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        for folder in (self.path, self.import_dir):
            if folder is not None and (folder / VISION_TAIL_FILE).is_file():
                return load_file(str(folder / VISION_TAIL_FILE))
        return {}


def resolve_checkpoint(path: str | Path) -> CheckpointSource:
    """Find the dist checkpoint under ``path``: an import directory, one trainer ``iter_*``
    checkpoint, a trainer checkpoint root (follows ``latest``) or a run directory."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not path.is_dir():
        raise IncompleteCheckpointError(f"{path}: checkpoint directory does not exist")
    for candidate in (path / LATEST, path / "checkpoints" / LATEST):
        if candidate.is_file():
            name = candidate.read_text().strip()
            path = candidate.parent / name
            if not path.is_dir():
                raise IncompleteCheckpointError(f"{candidate} names {name!r}, which is missing")
            break
    needed = ["metadata.json", "common.pt", ".metadata"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing or not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise IncompleteCheckpointError(
            f"{path}: not a complete megatron dist checkpoint (missing {missing or 'shards'}); "
            "pass the output of `vwlmm-convert import` or a trainer checkpoint folder (its "
            "`latest` marker or an iter_* folder). A save killed midway leaves an *.tmp folder, "
            "which is never complete.")
    if not list(path.glob("*.distcp")):
        raise IncompleteCheckpointError(f"{path}: no *.distcp tensor files")
    common = dist_checkpointing.load_common_state_dict(str(path))
    conversion = dict(common.get("conversion") or {})
    import_dir: Optional[Path] = path
    if "vwlmm_config" in common:
        config = config_from_dict(common["vwlmm_config"], f"{path}/common.pt")
    elif isinstance(common.get("config"), Mapping) and "model" in common["config"]:
        config = trainer_model_config(common["config"])
        init_from = common["config"]["model"].get("init_from")
        import_dir = Path(init_from) if init_from else None
        if import_dir is not None and (import_dir / CONFIG_FILE).is_file():
            conversion = json.loads((import_dir / CONFIG_FILE).read_text()).get("source", {})
    else:
        raise IncompleteCheckpointError(
            f"{path}/common.pt holds no model config (neither 'vwlmm_config' nor a trainer "
            "'config'); cannot rebuild the model")
    return CheckpointSource(path=path, config=config, conversion=conversion, import_dir=import_dir)


def load_checkpoint(source: CheckpointSource):
    """A TP1PP1 model holding the checkpoint's weights (whatever layout saved them)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    model = full_model(source.config)
    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(source.path))
    except CheckpointingException as exc:
        raise IncompleteCheckpointError(
            f"{source.path}: the checkpoint does not hold every tensor of the model its config "
            f"describes ({exc})") from exc
    model.load_state_dict(loaded["model"])
    return model

"""Megatron dist-checkpointing (torch_dist) saves that survive preemption and reshard on load.

Layout under the checkpoint folder::

    iter_0000120/        one complete checkpoint (renamed into place only once complete)
    iter_0000140.tmp/    a save in progress (or killed midway: ignored and removed later)
    latest               the name of the newest complete checkpoint (atomic rename)

Each checkpoint holds the model (per TP/PP shard, reshardable), the optimizer (distributed
optimizer in the fully-reshardable model-space format), the LR scheduler, every rank's RNG
states, the data position (consumed samples), the layout and the run's config. Loading into a
different TP/PP layout works for model and optimizer; RNG states are then re-seeded (they are
per-rank and have no meaning in another layout).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
_PREFIX = "iter_"


@dataclass
class TrainState:
    """Where training stands: what the loop needs to continue exactly."""

    iteration: int = 0
    consumed_samples: int = 0


def _name(iteration: int) -> str:
    return f"{_PREFIX}{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None; a marker naming a missing folder is an error."""
    marker = Path(root) / LATEST
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    path = Path(root) / name
    if not path.is_dir():
        raise FileNotFoundError(f"{marker} names {name!r}, which does not exist; the checkpoint "
                                "folder was modified by hand")
    return path


def list_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints, oldest first (``.tmp`` folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(_PREFIX) and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def _rng_object(layout: Dict[str, int]):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state", state, (layout["pp"], layout["tp"], layout["dp"]),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
         ps.get_data_parallel_rank(with_context_parallel=True)),
        replica_id=0,
    )


def _restore_rng(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def current_layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(with_context_parallel=True),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    }


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _model_sharded(model_chunks) -> Dict[str, Any]:
    """The model's own sharded state (keys without the DDP wrapper's ``module.`` prefix, so
    the conversion tools and any wrapper read the same names)."""
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _flat_model_sd(model_sd: Dict[str, Any]) -> Dict[str, Any]:
    merged: Dict[str, Any] = {}
    for sd in model_sd.values():
        merged.update(sd)
    return merged


def _materialize_optimizer_state(optimizer) -> None:
    """Give a never-stepped DistributedOptimizer its Adam state tensors before a load.

    Without Apex/TE (CPU runs) megatron reads ``step`` out of the torch optimizer's per-param
    state, which only exists after a first step; megatron's own helper runs one zero-gradient
    step whose values the load then overwrites in place (weights are loaded after it).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not inner.state and \
                hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


class CheckpointManager:
    """Save / load / prune checkpoints of one run; every rank calls every method."""

    def __init__(self, root: Path, keep_last: int, config_dict: Dict[str, Any],
                 fault_kill_during_save: Optional[int] = None) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.config_dict = config_dict
        self.fault_kill_during_save = fault_kill_during_save

    # ---------------------------------------------------------------- save
    def save(self, state: TrainState, model_chunks, optimizer, scheduler) -> Path:
        """Write a complete checkpoint for ``state.iteration``, then move ``latest`` to it."""
        from megatron.core import dist_checkpointing

        final = self.root / _name(state.iteration)
        tmp = self.root / (final.name + ".tmp")
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
            tmp.mkdir()
        _barrier()
        layout = current_layout()
        model_sd = _model_sharded(model_chunks)
        sharded = dict(model_sd)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            _flat_model_sd(model_sd),
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        sharded["rng_state"] = _rng_object(layout)
        sharded["scheduler"] = scheduler.state_dict()
        sharded["train_state"] = {"iteration": state.iteration,
                                  "consumed_samples": state.consumed_samples}
        sharded["layout"] = layout
        sharded["config"] = self.config_dict
        dist_checkpointing.save(sharded, str(tmp), sharded_strategy=("torch_dist", 1))
        if self.fault_kill_during_save == state.iteration:
            # Failure injection: the shard files exist but the save never committed.
            os.kill(os.getpid(), signal.SIGKILL)
        _barrier()
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            marker_tmp = self.root / (LATEST + ".tmp")
            with open(marker_tmp, "w") as f:
                f.write(final.name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(marker_tmp, self.root / LATEST)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        keep = list_checkpoints(self.root)[-self.keep_last:]
        for path in list_checkpoints(self.root):
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(f"{_PREFIX}*.tmp"):
            shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def load(self, path: Path, model_chunks, optimizer=None, scheduler=None) -> TrainState:
        """Restore into the current layout; ``optimizer=None`` loads weights only (init_from)."""
        from megatron.core import dist_checkpointing

        path = Path(path)
        common = dist_checkpointing.load_common_state_dict(str(path))
        layout = current_layout()
        saved_layout = common.get("layout")
        same_layout = saved_layout == layout
        model_sd = _model_sharded(model_chunks)
        sharded: Dict[str, Any] = dict(model_sd)
        if optimizer is not None:
            _materialize_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                _flat_model_sd(model_sd), is_loading=True,
                metadata={"distrib_optim_sharding_type": "fully_reshardable"})
            if same_layout:
                sharded["rng_state"] = _rng_object(layout)
        loaded = dist_checkpointing.load(sharded, str(path), sharded_strategy=None)
        for key, chunk in zip(sorted(model_sd), model_chunks):
            _unwrap(chunk).load_state_dict(loaded[key])
        if optimizer is None:
            return TrainState()
        optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(common["scheduler"])
        if "rng_state" in loaded:
            _restore_rng(loaded["rng_state"])
        ts = common["train_state"]
        return TrainState(iteration=int(ts["iteration"]),
                          consumed_samples=int(ts["consumed_samples"]))

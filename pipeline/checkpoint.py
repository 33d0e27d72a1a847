"""Megatron dist-checkpointing (torch_dist) saves that survive preemption and reshard on load.

The folder layout, the crash-safe commit and the pruning policy are
``megatron_vwlmm/checkpoint/layout.py``'s; this module writes and reads what goes inside a
checkpoint. Each holds the model (per TP/PP shard, reshardable), the optimizer (distributed
optimizer in the fully-reshardable model-space format), the LR scheduler, every rank's RNG
states, the data position (consumed samples), the layout, the run's config, and the resolved
model config and weight provenance (``megatron_vwlmm/checkpoint/metadata.py``) that exports
read. Loading into a different TP/PP layout works for model and optimizer; RNG states are then
re-seeded (they are per-rank and have no meaning in another layout).

Provenance: a run that starts from an import (``model.init_from``) records the import's
provenance in every checkpoint and copies its vision tail into each, and a resumed run takes
both from the checkpoint it resumes, so ``vwlmm-convert export`` of any checkpoint finds the
HF source, the tokenizer and the whole vision tower.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_vwlmm.checkpoint import fingerprint, layout, safe_read
from megatron_vwlmm.checkpoint.layout import Marker, latest_checkpoint, list_checkpoints
from megatron_vwlmm.checkpoint.metadata import (
    CONFIG_KEY,
    PROVENANCE_KEY,
    TOKENIZER_KEY,
    TRAIN_CONFIG_KEY,
    Provenance,
    config_to_dict,
)
from megatron_vwlmm.parallel import megatron_compat
from vwlmm_data import hooks
from vwlmm_data.errors import last_line
from pipeline.config import ConfigError


@dataclass
class TrainState:
    """Where training stands: what the loop needs to continue exactly."""

    iteration: int = 0
    consumed_samples: int = 0
    saved_layout: Optional[Dict[str, int]] = None  # layout of the checkpoint it came from


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    """All chunks' entries in one dict for the optimizer (which maps params to their shards).

    Virtual-pipeline chunks reuse local names (``decoder.layers.0`` in every chunk), so the
    chunk key is kept as a prefix.
    """
    return {f"{chunk}.{name}": value for chunk, sd in model_sd.items()
            for name, value in sd.items()}


@contextlib.contextmanager
def _staging_folder_expected() -> Iterator[None]:
    """Silence megatron's "Overwriting old incomplete / corrupted checkpoint" warning: the
    staging folder it saves into always holds our marker already (``layout.stage``)."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Overwriting old incomplete" not in record.getMessage()

    logger = logging.getLogger("megatron.core.dist_checkpointing.serialization")
    drop = _Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def plan_resume(root: Path, auto_resume: bool, iteration: Optional[int] = None) -> Optional[Path]:
    """The checkpoint to resume from (None: a new run), or ConfigError for a folder whose
    state leaves it ambiguous. Reads only: the trainer calls it after ``layout.recover``, and
    ``pipeline/validate.py`` before any process group exists (the same choice, checked early).

    ``iteration`` (``checkpoint.resume_iteration``) picks an older checkpoint than ``latest``,
    e.g. when the newest one is damaged.

    A new run beside existing checkpoints needs ``checkpoint.auto_resume=false``; they are
    then never pruned by it (``layout.prune``), except that saving the same iteration replaces
    one (only if vwlmm wrote it).
    """
    latest = latest_checkpoint(root)
    existing = list_checkpoints(root)
    if iteration is not None:
        chosen = Path(root) / layout.checkpoint_name(iteration)
        if chosen not in existing:
            raise ConfigError(
                f"checkpoint.resume_iteration={iteration}: {chosen} does not exist (checkpoints "
                f"in {root}: {', '.join(p.name for p in existing) or 'none'})")
        return chosen
    if auto_resume and latest is None and existing:
        raise ConfigError(
            f"checkpoint.dir={root}: holds checkpoints ({existing[0].name}..{existing[-1].name}) "
            f"but no `{layout.LATEST}` naming the one to resume; write its name into "
            f"{root / layout.LATEST}, or set checkpoint.auto_resume=false to start a new run "
            "beside them, or use another checkpoint.dir")
    return latest if auto_resume else None


class CheckpointManager:
    """Save / load / prune checkpoints of one run; every rank calls every method."""

    def __init__(self, root: Path, keep_last: int, config_dict: Dict[str, Any],
                 tokenizer: Optional[Dict[str, Any]] = None) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.config_dict = config_dict
        self.tokenizer = tokenizer  # the identity of the data's tokenizer (manifest)
        # The run's identity in the checkpoint markers (pruning stays within it); a resumed
        # run takes it from its checkpoint. Only rank 0 writes markers.
        self.run_id = uuid.uuid4().hex
        self.provenance = Provenance()
        self._vision_tail: Optional[Path] = None  # the file the next save copies
        megatron_compat.install_checkpoint_queue()

    def resume_point(self, auto_resume: bool, iteration: Optional[int] = None) -> Optional[Path]:
        """Finish what a killed save left (rank 0), then ``plan_resume``."""
        if _rank() == 0:
            for note in layout.recover(self.root):
                print(f"[vwlmm-train] warning: {note}", flush=True)
        _barrier()
        chosen = plan_resume(self.root, auto_resume, iteration)
        existing = list_checkpoints(self.root)
        if chosen is None and existing and _rank() == 0:
            print(f"[vwlmm-train] checkpoint.auto_resume=false: a new run in {self.root}, beside "
                  f"{len(existing)} existing checkpoint(s) ({existing[0].name}.."
                  f"{existing[-1].name}); this run never prunes them, and replaces one only by "
                  "saving the same iteration", flush=True)
        return chosen

    # ---------------------------------------------------------------- save
    def save(self, state: TrainState, model_chunks, optimizer, scheduler) -> Path:
        """Write a complete checkpoint for ``state.iteration``, then move ``latest`` to it."""
        from megatron.core import dist_checkpointing

        tmp = layout.staging_folder(self.root, state.iteration)
        if _rank() == 0:
            layout.stage(self.root, Marker(self.run_id, state.iteration))
        _barrier()
        layout_now = current_layout()
        model_sd = _model_sharded(model_chunks)
        prints = fingerprint.fingerprint(model_sd.values(), optimizer)
        sharded = dict(model_sd)
        with megatron_compat.fully_reshardable_offsets(optimizer):
            sharded["optimizer"] = optimizer.sharded_state_dict(
                _flat_model_sd(model_sd),
                metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        sharded["rng_state"] = _rng_object(layout_now)
        sharded["scheduler"] = scheduler.state_dict()
        sharded["train_state"] = {"iteration": state.iteration,
                                  "consumed_samples": state.consumed_samples}
        sharded["layout"] = layout_now
        sharded[TRAIN_CONFIG_KEY] = self.config_dict
        # The exact model config and where the weights came from: exports need no trainer code.
        sharded[CONFIG_KEY] = config_to_dict(_unwrap(model_chunks[0]).vwlmm_config)
        sharded[PROVENANCE_KEY] = self.provenance.to_dict()
        sharded[TOKENIZER_KEY] = self.tokenizer
        with _staging_folder_expected():
            dist_checkpointing.save(sharded, str(tmp), sharded_strategy=("torch_dist", 1))
        hooks.fire("checkpoint.written", iteration=state.iteration)  # shards on disk, uncommitted
        _barrier()
        final = self.root / layout.checkpoint_name(state.iteration)
        if _rank() == 0:
            fingerprint.write(tmp, prints)
            if self._vision_tail is not None:
                shutil.copyfile(self._vision_tail, tmp / layout.VISION_TAIL_FILE)
            layout.commit(self.root, tmp)
            layout.prune(self.root, final, self.keep_last)
        if self._vision_tail is not None:
            self._vision_tail = final / layout.VISION_TAIL_FILE
        _barrier()
        return final

    # ---------------------------------------------------------------- load
    def load(self, path: Path, model_chunks, optimizer=None, scheduler=None) -> TrainState:
        """Restore into the current layout; ``optimizer=None`` loads weights only (init_from).
        Either way the checkpoint's provenance becomes the one later saves record."""
        from megatron.core import dist_checkpointing
        # torch's distributed checkpoint reports a failed read as a BaseException.
        from torch.distributed.checkpoint.api import CheckpointException

        path = layout.find_checkpoint(Path(path))
        common = safe_read.require_loadable(path)
        where = f"{path}/common.pt"
        self.provenance = Provenance.of(common, where)
        self._vision_tail = self.provenance.vision_tail_file(path)
        marker = Marker.read(path)
        if optimizer is not None and marker is not None:
            self.run_id = marker.run_id  # a resume continues the run
        layout_now = current_layout()
        saved_layout = common.get("layout")
        same_layout = saved_layout == layout_now
        model_sd = _model_sharded(model_chunks)
        sharded: Dict[str, Any] = dict(model_sd)
        if optimizer is not None:
            megatron_compat.materialize_optimizer_state(optimizer)
            with megatron_compat.fully_reshardable_offsets(optimizer):
                sharded["optimizer"] = optimizer.sharded_state_dict(
                    _flat_model_sd(model_sd), is_loading=True,
                    metadata={"distrib_optim_sharding_type": "fully_reshardable"})
            if same_layout:
                sharded["rng_state"] = _rng_object(layout_now)
        try:
            loaded = dist_checkpointing.load(sharded, str(path), sharded_strategy=None)
        except (Exception, CheckpointException) as exc:  # a damaged or truncated tensor file
            raise safe_read.CheckpointError(f"{path}: could not be loaded "
                                            f"({type(exc).__name__}: {last_line(exc)[:300]})") \
                from exc
        for key, chunk in zip(sorted(model_sd), model_chunks):
            _unwrap(chunk).load_state_dict(loaded[key])
        if optimizer is not None:
            megatron_compat.load_optimizer_state(optimizer, loaded["optimizer"])
        sections = [fingerprint.MODEL] + ([fingerprint.OPTIMIZER] if optimizer is not None else [])
        fingerprint.verify(path, fingerprint.fingerprint(_model_sharded(model_chunks).values(),
                                                         optimizer), sections)
        if optimizer is None:
            return TrainState()
        if scheduler is not None:
            scheduler.load_state_dict(common["scheduler"])
        if "rng_state" in loaded:
            _restore_rng(loaded["rng_state"])
        ts = common["train_state"]
        return TrainState(iteration=int(ts["iteration"]),
                          consumed_samples=int(ts["consumed_samples"]), saved_layout=saved_layout)

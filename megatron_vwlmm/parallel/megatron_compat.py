"""Every place vwlmm reaches into megatron-core internals, with the releases it is verified on.

The trainer's checkpoint code (``pipeline/checkpoint.py``) and the load-time fingerprint
(``megatron_vwlmm/checkpoint/fingerprint.py``) call these functions instead of touching
megatron's private attributes themselves, so a megatron upgrade is checked in one file.

Verified releases: megatron-core 0.16.1 runs every test of the suite (CI, Python 3.11). The
functions patched or read here (``DistributedOptimizer.get_parameter_state_dp_zero``,
``sharded_param_state_fully_reshardable``, ``load_parameter_state_from_fully_reshardable``,
``_get_main_param_and_optimizer_states``, ``_set_main_param_and_optimizer_states``,
``filesystem_async._results_queue``) have the same behaviour in 0.17.0 through 0.19.2 (Python
3.12 only), which GPU hosts may install: the range ``VERIFIED_RANGE`` below, the same as
``setup.py``'s requirement (``tests/megatron_vwlmm/parallel/test_megatron_compat.py`` keeps the
two equal, so widening the requirement means re-checking this file).

What is patched, and why:

* **Fully-reshardable optimizer saves with more than one grad bucket** (every release in the
  range). ``get_parameter_state_dp_zero`` gathers each bucket's optimizer state into one flat
  tensor per buffer with the padding at the end of each bucket stripped, but
  ``sharded_param_state_fully_reshardable`` slices that tensor with ``param_index_map``
  offsets, which count the padding. Every parameter after the first bucket is read from the
  wrong offset, and the overshoot is zero-filled with only a warning ("param range exceeds
  unpadded buffer"): the checkpoint holds shifted and zeroed main params and Adam moments, and
  a resume trains on them. A grad buffer has several buckets whenever a parameter needs a
  bucket of its own (VW-LMM's stage replicas at PP >= 2, megatron's tied embeddings) or
  ``overlap_grad_reduce`` sets a bucket size. ``fully_reshardable_offsets`` lays each gathered
  tensor out in buffer coordinates again (each bucket's data at the bucket's offset), which is
  what the slicing expects; the data themselves are untouched. Loading needs no change: it
  slices per parameter, not per buffer.
* **Adam's ``step`` without Apex/TE** (torch's AdamW): megatron expects ``step`` among the
  per-parameter tensors it never saves, and would restore one tensor shared by every parameter
  (``load_optimizer_state``).
* **The torch_dist writer's results queue**: an in-process queue instead of a spawned
  ``Manager`` server (``install_checkpoint_queue``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import warnings
from typing import Any, Dict, Iterator, Tuple

import torch

# Inclusive lower, exclusive upper bound: the releases this module was checked against.
VERIFIED_RANGE = ("0.16", "0.20")


def megatron_version() -> str:
    from megatron.core.package_info import __version__

    return __version__


# Warnings megatron-core (and torch underneath it) repeats per rank and per importing module,
# none of which asks anything of a vwlmm user: Apex/TE fallbacks (vwlmm runs without them), a
# CUDA tuning hint for overlap features vwlmm does not rely on, deprecations inside the
# libraries' own calls.
_KNOWN_WARNINGS = (
    (UserWarning, r"(Transformer Engine and )?Apex (is|are) not installed"),
    (UserWarning, r"full scope is deprecated"),
    (UserWarning, r".*CUDA_DEVICE_MAX_CONNECTIONS"),
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (FutureWarning, r"`load_state_dict` is deprecated"),
)
_QUIET_LOGGERS = ("megatron.core.rerun_state_machine",)


def quiet_known_warnings() -> None:
    """Hide ``_KNOWN_WARNINGS`` in this process (call before megatron is imported)."""
    for category, pattern in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _chained(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(opt) -> bool:
    return hasattr(opt, "gbuf_ranges") and hasattr(opt, "buffers")


# -- the torch_dist writer ------------------------------------------------------------------------

def install_checkpoint_queue() -> None:
    """Give megatron's torch_dist writer an in-process results queue before its first save.

    Left to itself, the writer creates that queue on the first save as a spawn-context
    ``Manager`` server (``filesystem_async._get_write_results_queue``): a second process that
    re-imports the trainer's main module (seconds of start-up per rank) and, when the trainer
    is killed (OOM killer, preemption without grace, node fault), is orphaned holding the
    launcher's stdout, so torchrun/srun never see EOF. The queue only has to cross processes
    for asynchronous saves; the trainer saves synchronously, where megatron runs the writer in
    the calling process (``AsyncRequest.execute_sync``), which puts its results here and reads
    them back before returning. (Were a save made asynchronous, its forked writer's results
    would not reach this queue and megatron would fail the save: "results_queue should not be
    empty".)
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


# -- distributed optimizer: fully-reshardable saves ------------------------------------------------

def _in_buffer_coordinates(opt, state: Dict[Any, Any]) -> Dict[Any, Any]:
    """``get_parameter_state_dp_zero``'s result with each world tensor re-laid in buffer
    coordinates: bucket ``b``'s unpadded data at ``bucket.offset``, zeros in the padding."""
    for gbuf_idx, by_dtype in state.items():
        if not isinstance(gbuf_idx, int):
            continue  # "buckets_coalesced"
        buffer = opt.buffers[gbuf_idx]
        for world in by_dtype.values():
            for key, compact in list(world.items()):
                if not isinstance(compact, torch.Tensor):
                    continue  # "numel_unpadded"
                if compact.numel() != buffer.numel_unpadded:
                    raise RuntimeError(
                        f"megatron-core {megatron_version()}: the gathered optimizer state "
                        f"'{key}' holds {compact.numel()} elements where this module expects "
                        f"the buffer's unpadded {buffer.numel_unpadded}; "
                        "megatron_vwlmm/parallel/megatron_compat.py needs updating for it")
                laid = compact.new_zeros(buffer.numel)
                start = 0
                for bucket in buffer.buckets:
                    n = bucket.numel_unpadded
                    laid[bucket.offset:bucket.offset + n] = compact[start:start + n]
                    start += n
                world[key] = laid
    return state


@contextlib.contextmanager
def fully_reshardable_offsets(optimizer) -> Iterator[None]:
    """Within the block, ``optimizer.sharded_state_dict(..., fully_reshardable)`` slices every
    parameter's optimizer state from the right offset (see the module docstring)."""
    patched = []
    for opt in _chained(optimizer):
        if not _is_distributed(opt):
            continue
        original = opt.get_parameter_state_dp_zero

        def gather(*args, _opt=opt, _original=original, **kwargs):
            state = _original(*args, **kwargs)
            return None if state is None else _in_buffer_coordinates(_opt, state)

        opt.get_parameter_state_dp_zero = gather
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt.get_parameter_state_dp_zero


# -- optimizer state: loading and reading ----------------------------------------------------------

def materialize_optimizer_state(optimizer) -> None:
    """Give a never-stepped DistributedOptimizer its Adam state tensors before a load.

    Without Apex/TE (CPU runs) megatron reads ``step`` out of the torch optimizer's per-param
    state, which only exists after a first step; megatron's own helper runs one zero-gradient
    step whose values the load then overwrites in place (weights are loaded after it).
    """
    for opt in _chained(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not inner.state and \
                hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()


def load_optimizer_state(optimizer, state: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` plus two fixes for megatron-core without Apex/TE (CPU).

    There torch's AdamW keeps a per-parameter ``step`` tensor that megatron (a) expects among
    the reshardable per-parameter tensors, which it never saves (KeyError on load), and (b)
    restores as *one* tensor shared by every parameter, which AdamW would then increment once
    per parameter per step (wrong bias correction after resume). (a): the missing source is the
    destination's own step; (b): each parameter gets its own copy afterwards.
    """
    optimizers = _chained(optimizer)
    patched = []
    for opt in optimizers:
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def with_own_step(model_param, tensors, _opt=opt, _setter=setter):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            own = _opt.optimizer.state.get(main_param, {})
            if "step" in own and "step" not in tensors:
                tensors = {**tensors, "step": own["step"]}
            return _setter(model_param, tensors)

        opt._set_main_param_and_optimizer_states = with_own_step
        patched.append(opt)
    try:
        optimizer.load_state_dict(state)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    for opt in optimizers:
        inner = getattr(opt, "optimizer", None)
        for param_state in (inner.state.values() if inner is not None else []):
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


def main_param_states(optimizer) -> Iterator[Tuple[torch.nn.Parameter, Dict[str, torch.Tensor],
                                                   bool]]:
    """``(model_param, {"param": main param, "exp_avg": ..., ...}, dp_sharded)`` for every
    parameter this rank's optimizer updates.

    ``dp_sharded``: the tensors are this rank's slice of the parameter (distributed optimizer,
    each DP rank a disjoint range); otherwise each DP rank holds the whole parameter. Only
    tensors with the parameter's element count are given (never ``step``).
    """
    for opt in _chained(optimizer):
        if _is_distributed(opt):
            for model_param in opt.model_param_group_index_map:
                tensors = opt._get_main_param_and_optimizer_states(model_param)
                yield model_param, _per_element(tensors), True
            continue
        inner = opt.optimizer
        model_groups = getattr(opt, "float16_groups", None)
        if model_groups is not None:  # Float16OptimizerWithFloat16Params
            pairs = [pair for models, mains in zip(model_groups, opt.fp32_from_float16_groups)
                     for pair in zip(models, mains)]
            pairs += [(p, p) for group in opt.fp32_from_fp32_groups for p in group]
        else:  # FP32Optimizer: the model's parameters are the main parameters
            pairs = [(p, p) for group in inner.param_groups for p in group["params"]]
        for model_param, main in pairs:
            tensors = {"param": main, **inner.state.get(main, {})}
            yield model_param, _per_element(tensors), False


def _per_element(tensors: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    numel = tensors["param"].numel()
    return {k: v for k, v in tensors.items()
            if k != "step" and isinstance(v, torch.Tensor) and v.numel() == numel}

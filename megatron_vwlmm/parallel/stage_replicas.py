"""Parameters that live on both the first and the last pipeline stage, kept identical.

VW-LMM's last stage needs the adapter (and the frozen vision encoder) to form the visual-word
target, and in PIF mode the first stage needs the VM head; each stage holds a copy. As megatron
does for tied input/output embeddings, the copies' gradients are summed over the embedding group
(first + last stage ranks) after the data-parallel reduction, so both copies see the PP=1
gradient and take the same optimizer step.

Attributes set on each replicated parameter, read by megatron and by us:
- ``shared_embedding``: megatron's DDP gives the parameter its own grad bucket, so the
  distributed optimizer shards it identically on both stages (the all-reduce below then sums
  matching shards);
- ``shared`` (secondary copy only): megatron's grad-norm and optimizer counting skip it, so the
  norm counts the parameter once;
- ``stage_replicated`` / ``stage_replica_secondary``: ours (grad sync, checkpoint replica ids).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads as megatron_finalize_model_grads


def mark_stage_replicated(module: torch.nn.Module, *, secondary: bool) -> None:
    for param in module.parameters():
        param.stage_replicated = True
        param.stage_replica_secondary = secondary
        param.shared_embedding = True
        if secondary:
            param.shared = True


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def allreduce_stage_replicated_grads(model: List[torch.nn.Module]) -> None:
    """Sum the replicated parameters' grads over the embedding group (no-op at PP=1)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return
    group = parallel_state.get_embedding_group()
    grads = []
    for chunk in model:
        for param in _unwrap(chunk).parameters():
            if not getattr(param, "stage_replicated", False) or not param.requires_grad:
                continue
            grad = getattr(param, "main_grad", None)
            grad = grad if grad is not None else param.grad
            if grad is None:
                grad = torch.zeros_like(param)
                param.grad = grad
            grads.append(grad)
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def finalize_model_grads(
    model: List[torch.nn.Module], num_tokens: Optional[torch.Tensor] = None, **kwargs
) -> None:
    """megatron's ``finalize_model_grads`` followed by the stage-replica gradient sum.

    ``num_tokens`` (set by megatron's schedules under ``calculate_per_token_loss``) is not used:
    per-token losses arrive already divided by the global batch's totals
    (``model/forward_step.py``), so the gradients need no further scaling.
    """
    del num_tokens
    megatron_finalize_model_grads(model, None, **kwargs)
    allreduce_stage_replicated_grads(model)

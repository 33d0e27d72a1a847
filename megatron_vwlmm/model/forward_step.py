"""megatron schedule glue: one micro-batch through the model, and the loss from per-position
sums to the reduced step loss (``loss_func`` per micro-batch, ``reduce_step_losses`` per step).

Two normalisations of the loss of a step:

* per micro-batch (LLaVA's): each micro-batch's loss is the mean over its own supervised
  targets; megatron averages micro-batches and data-parallel ranks.
* per token (``TokenTotals`` given): each micro-batch contributes its *sums* divided by the
  step's totals over all micro-batches and data-parallel ranks, so the gradient is that of the
  mean over every target of the global batch, whatever the packing or split. megatron's
  ``calculate_per_token_loss`` switches off its own averaging (schedules and DDP); the totals
  are known before the forward pass because they are counted from the data
  (``VWLMMBatch.num_lm_tokens`` / ``num_vm_positions``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from megatron_vwlmm.model.batch import VWLMMBatch
from megatron_vwlmm.model.packing import PackedSequence
from megatron_vwlmm.model.vwlmm_model import LM_COUNT, LM_SUM, VM_COUNT, VM_SUM

LOSS_NORMALIZATIONS = ("per_micro_batch", "per_token")


@dataclass(frozen=True)
class TokenTotals:
    """LM targets and visual-word positions of a whole global batch (all micro-batches, all DP
    ranks): the denominators of per-token normalisation."""

    lm_tokens: int
    vm_positions: int


def loss_func(lambda_vm: float, output_tensor: torch.Tensor, *,
              token_totals: Optional[TokenTotals] = None):
    """The loss of one micro-batch from its ``[lm_sum, lm_count, vm_sum, vm_count]``.

    Without ``token_totals``: ``lm_loss + lambda_vm * vm_loss`` with both means over this
    micro-batch (lm: supervised next-token targets; vm: "batchmean" over image positions, as
    the reference ``KLDivLoss``; a micro-batch without images contributes 0), megatron's
    2-tuple convention. With them: ``lm_sum / lm_total + lambda_vm * vm_sum / vm_total``, as
    megatron's per-token 3-tuple. The metrics carry the sums and counts so that reports can be
    token-weighted over any set of micro-batches.
    """
    stats = output_tensor.float()
    lm_loss = stats[LM_SUM] / stats[LM_COUNT].clamp(min=1)
    vm_loss = stats[VM_SUM] / stats[VM_COUNT].clamp(min=1)
    metrics = {"lm_sum": stats[LM_SUM].detach().clone(),
               "lm_count": stats[LM_COUNT].detach().clone(),
               "vm_sum": stats[VM_SUM].detach().clone(),
               "vm_count": stats[VM_COUNT].detach().clone()}
    if token_totals is None:
        total = lm_loss + lambda_vm * vm_loss
        # Clones: megatron's schedule divides the returned loss in place by the number of
        # micro-batches, which would also scale a detached view of it.
        metrics.update(lm_loss=lm_loss.detach().clone(), vm_loss=vm_loss.detach().clone(),
                       total_loss=total.detach().clone())
        return total, metrics
    total = (stats[LM_SUM] / max(token_totals.lm_tokens, 1)
             + lambda_vm * stats[VM_SUM] / max(token_totals.vm_positions, 1))
    # The token count is megatron's accounting only: the gradient is already normalised, and
    # ``stage_replicas.finalize_model_grads`` does not rescale it.
    return total, stats[LM_COUNT].detach().to(torch.int), metrics


def forward_step(batch: Union[VWLMMBatch, PackedSequence, None], model: Any,
                 token_totals: Optional[TokenTotals] = None):
    """Run ``model`` on ``batch``; returns ``(output_tensor, loss_func)`` for the schedules.

    Middle pipeline stages get no batch (their input is the previous stage's hidden states,
    already set on the model by the schedule), or only the ``PackedSequence`` of a packed
    micro-batch, which their attention needs.
    """
    from megatron.core.utils import get_attr_wrapped_model

    lambda_vm = get_attr_wrapped_model(model, "vwlmm_config").lambda_vm
    if batch is None or isinstance(batch, PackedSequence):
        output = model(tokens=None, image_token_mask=None, images=None, labels=None,
                       packing=batch)
    else:
        output = model(
            tokens=batch.tokens,
            image_token_mask=batch.image_token_mask,
            images=batch.images,
            labels=batch.labels,
            packing=batch.packing,
        )
    return output, functools.partial(loss_func, lambda_vm, token_totals=token_totals)


def reduce_step_losses(losses_reduced: list, lambda_vm: float, token_weighted: bool,
                       dp_group=None) -> dict:
    """A step's losses over its micro-batches' ``loss_func`` metrics and the data-parallel ranks
    (meaningful on the last pipeline stage): token-weighted (sums over counts: per-token
    training and every validation), or the mean of micro-batch means (per-micro-batch
    training, what that mode optimises)."""
    import torch.distributed as dist

    if not losses_reduced:
        return {}
    dp = dist.get_world_size(dp_group) if dp_group is not None else 1
    if token_weighted:
        keys = ("lm_sum", "lm_count", "vm_sum", "vm_count")
        values = torch.stack([torch.stack([d[k].float() for d in losses_reduced]).sum(0)
                              for k in keys]).double()
        if dp > 1:
            dist.all_reduce(values, group=dp_group)
        lm_sum, lm_count, vm_sum, vm_count = values.cpu().tolist()
        lm, vm = lm_sum / max(lm_count, 1), vm_sum / max(vm_count, 1)
        return {"lm_loss": lm, "vm_loss": vm, "total_loss": lm + lambda_vm * vm}
    keys = ("lm_loss", "total_loss", "vm_loss")
    values = torch.stack([torch.stack([d[k].float() for d in losses_reduced]).mean(0)
                          for k in keys])
    if dp > 1:
        dist.all_reduce(values, group=dp_group)
        values /= dp
    return {k: float(v) for k, v in zip(keys, values.cpu())}

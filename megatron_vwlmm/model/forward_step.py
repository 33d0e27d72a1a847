"""megatron schedule glue: one micro-batch through the model, and the loss reduction."""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from megatron_vwlmm.model.batch import VWLMMBatch
from megatron_vwlmm.model.vwlmm_model import LM_COUNT, LM_SUM, VM_COUNT, VM_SUM


def loss_func(lambda_vm: float, output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``lm_loss + lambda_vm * vm_loss`` of one micro-batch (megatron's 2-tuple convention).

    lm_loss: mean CE over supervised next-token targets; vm_loss: mean KL over the visual-word
    positions ("batchmean" over image positions, as the reference ``KLDivLoss``). A micro-batch
    without images contributes vm_loss = 0.
    """
    stats = output_tensor.float()
    lm_loss = stats[LM_SUM] / stats[LM_COUNT].clamp(min=1)
    vm_loss = stats[VM_SUM] / stats[VM_COUNT].clamp(min=1)
    total = lm_loss + lambda_vm * vm_loss
    # Clones: megatron's schedule divides the returned loss in place by the number of
    # micro-batches, which would also scale a detached view of it.
    return total, {
        "lm_loss": lm_loss.detach().clone(),
        "vm_loss": vm_loss.detach().clone(),
        "total_loss": total.detach().clone(),
    }


def forward_step(batch: Optional[VWLMMBatch], model: Any):
    """Run ``model`` on ``batch``; returns ``(output_tensor, loss_func)`` for the schedules.

    ``batch`` is None on middle pipeline stages: their input is the previous stage's hidden
    states, which the schedule has already set on the model.
    """
    from megatron.core.utils import get_attr_wrapped_model

    lambda_vm = get_attr_wrapped_model(model, "vwlmm_config").lambda_vm
    if batch is None:
        output = model(tokens=None, image_token_mask=None, images=None, labels=None)
    else:
        output = model(
            tokens=batch.tokens,
            image_token_mask=batch.image_token_mask,
            images=batch.images,
            labels=batch.labels,
        )
    return output, functools.partial(loss_func, lambda_vm)

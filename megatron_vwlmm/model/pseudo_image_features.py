"""PIF ("pseudo image features", paper Sec. 3.3): the decoder sees softmax(VM head(v)) @ E.

Under tensor parallelism both the visual-word logits ``z`` and the word embeddings ``E`` are
split by vocabulary rows, so ``softmax(z) @ E = allreduce_sum(q_local @ E_local)`` with the
softmax normaliser reduced across ranks first. The backward needs one more all-reduce (the
softmax's ``sum_v q_v dq_v`` term); megatron's region helpers cannot express that pair, hence
the custom autograd function. Computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _softmax_sharded(logits: torch.Tensor, group) -> torch.Tensor:
    z = logits.float()
    row_max = _all_reduce(z.max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX, group)
    exp = torch.exp(z - row_max)
    denom = _all_reduce(exp.sum(dim=-1, keepdim=True), dist.ReduceOp.SUM, group)
    return exp / denom


class _VocabParallelSoftmaxEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vm_logits, embedding_weight, group):
        probs = _softmax_sharded(vm_logits, group)
        out = probs @ embedding_weight.float()
        _all_reduce(out, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(probs, embedding_weight)
        ctx.group = group
        ctx.logits_dtype = vm_logits.dtype
        return out.to(embedding_weight.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        probs, embedding_weight = ctx.saved_tensors
        grad_out = grad_out.float()  # identical on every TP rank (replicated activations)
        grad_embedding = (probs.t() @ grad_out).to(embedding_weight.dtype)
        grad_probs = grad_out @ embedding_weight.float().t()
        dot = _all_reduce((probs * grad_probs).sum(dim=-1, keepdim=True), dist.ReduceOp.SUM,
                          ctx.group)
        grad_logits = (probs * (grad_probs - dot)).to(ctx.logits_dtype)
        return grad_logits, grad_embedding, None


def pseudo_image_features(
    vm_logits: torch.Tensor,
    embedding_weight: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """``softmax(vm_logits) @ E`` over the full vocabulary from this rank's vocab shards.

    vm_logits: [N, V/tp]; embedding_weight: [V/tp, h] (the same vocab rows). Returns [N, h],
    identical on every rank of ``tp_group``.
    """
    return _VocabParallelSoftmaxEmbed.apply(vm_logits, embedding_weight, tp_group)

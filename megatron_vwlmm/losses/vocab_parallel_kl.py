"""Vocab-parallel visual-word KL: ``KL(softmax(z) || softmax(s))`` per position, never gathering [N, V].

VW-LMM (arXiv 2403.07720) supervises the multimodal head's prediction ``s_{t-1}`` at every image
position with the visual-word distribution ``softmax(z_t)`` of the VM head
(``docs/ARCHITECTURE.md`` section 1).
Under tensor parallelism both heads are split by vocabulary rows, so rank r holds the same
vocab slice of ``s`` and ``z``. Per position, with every reduction over the full vocabulary:

    m_s, m_z   = max_v s, max_v z                     (one all-reduce MAX, both stacked)
    S_s, S_z   = sum_v exp(s - m_s), sum_v exp(z - m_z)
    A          = sum_v exp(z - m_z) * ((z - m_z) - (s - m_s))
                                                      (one all-reduce SUM: S_s, S_z, A stacked)
    KL         = A / S_z + log S_s - log S_z          (= sum_v q_v (log q_v - log p_v))

That is two collectives per call, batched over all positions, instead of the three per chunk
of the textbook recipe: ``A`` needs only the maxima, so it can travel with the sums, and the
maxima come from one cheap read-only ``amax`` over the whole shard. Every rank then computes KL
from the same reduced numbers, so the result is bitwise identical on every TP rank.

Backward is local to each shard, with no communication (q = softmax(z), p = softmax(s)):

    dKL/ds_v = p_v - q_v            dKL/dz_v = q_v (log q_v - log p_v - KL)

scaled by the incoming per-position gradient. q and p are recomputed chunk by chunk from the
saved input shards and five fp32 numbers per position, flash-attention style, so the extra
memory is O(chunk_size x V/tp) fp32 in both passes, never O(N x V).

Numerics: logits of any float dtype are promoted to fp32 inside the first subtraction (no fp32
copy of the shard is made); log-probabilities are formed as ``(x - m) - log S`` rather than
``x - (m + log S)``, which keeps them exact-to-fp32 even for logits of magnitude 1e4 where
``m + log S`` would round to the 1e-3 grid; no ``log`` of a probability is ever taken, so an
underflowed q_v or p_v gives 0 and finite log-probabilities instead of -inf or NaN. Inputs
must be finite (a -inf logit would turn ``0 * -inf`` into NaN).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

# fp32 elements per chunk buffer when ``chunk_size`` is not given (64 MiB; 524 rows at V/tp =
# 32000); a pass holds at most four such buffers whatever N is. Measured at N=2304, V=32000
# (benchmarks/RESULTS.md): on an H100, 256+ rows match or beat naive while 64 rows are 2-3x
# slower (kernel launches); on the 2-core CPU under contention 512 rows ran 0.4-0.6x naive while
# 32 rows ran 2-3x naive (many small OpenMP regions), and on a quiet CPU both beat naive.
DEFAULT_CHUNK_ELEMENTS = 1 << 24

# Rows of the [5, N] per-position statistics saved for backward.
_MAX_S, _MAX_Z, _LOG_SUM_S, _LOG_SUM_Z, _KL = range(5)


def resolve_tp_group(
    tp_group: Optional[dist.ProcessGroup],
) -> Optional[dist.ProcessGroup]:
    """The group to reduce over: the given one, else megatron's TP group if initialised.

    Returns None when there is nothing to reduce (no group, or a group of one rank), which makes
    the kernel run unsharded without touching ``torch.distributed``.
    """
    if tp_group is None and parallel_state.model_parallel_is_initialized():
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if tp_group is None or dist.get_world_size(group=tp_group) == 1:
        return None
    return tp_group


def _row_chunks(num_rows: int, chunk_size: int):
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


class VocabParallelVisualWordKL(torch.autograd.Function):
    """Autograd function behind :func:`visual_word_kl`; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, mm_logits, vm_logits, tp_group, chunk_size):
        num_rows = mm_logits.shape[0]
        # amax is exact in any float dtype and reads the shard without materialising anything.
        maxima = torch.stack(
            (mm_logits.amax(dim=-1).float(), vm_logits.amax(dim=-1).float())
        )
        if tp_group is not None and num_rows > 0:
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=tp_group)
        max_s, max_z = maxima

        # Rows: S_s, S_z, A (see module docstring); all three reduce with one SUM.
        partial = torch.empty(3, num_rows, dtype=torch.float32, device=mm_logits.device)
        for rows in _row_chunks(num_rows, chunk_size):
            # Mixed-dtype subtraction promotes to fp32: no separate fp32 copy of the chunk.
            shifted_s = mm_logits[rows] - max_s[rows, None]
            partial[0, rows] = torch.exp(shifted_s).sum(dim=-1)
            shifted_z = vm_logits[rows] - max_z[rows, None]
            exp_z = torch.exp(shifted_z)
            partial[1, rows] = exp_z.sum(dim=-1)
            # (z - m_z) - (s - m_s), in place, then weighted by exp(z - m_z).
            partial[2, rows] = exp_z.mul_(shifted_z.sub_(shifted_s)).sum(dim=-1)
            del shifted_s, shifted_z, exp_z
        if tp_group is not None and num_rows > 0:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=tp_group)
        sum_s, sum_z, weighted = partial
        log_sum_s, log_sum_z = torch.log(sum_s), torch.log(sum_z)
        kl = weighted / sum_z + (log_sum_s - log_sum_z)

        stats = torch.stack((max_s, max_z, log_sum_s, log_sum_z, kl))
        ctx.save_for_backward(mm_logits, vm_logits, stats)
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        mm_logits, vm_logits, stats = ctx.saved_tensors
        need_mm, need_vm = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_mm = torch.empty_like(mm_logits) if need_mm else None
        grad_vm = torch.empty_like(vm_logits) if need_vm else None
        if not (need_mm or need_vm):
            return None, None, None, None
        grad_kl = grad_kl.float()
        for rows in _row_chunks(mm_logits.shape[0], ctx.chunk_size):
            g = grad_kl[rows, None]
            # log q = (z - m_z) - log S_z; the two-step form keeps fp32 exactness (docstring).
            log_q = vm_logits[rows] - stats[_MAX_Z, rows, None]
            log_q.sub_(stats[_LOG_SUM_Z, rows, None])
            q = torch.exp(log_q)
            log_p = mm_logits[rows] - stats[_MAX_S, rows, None]
            log_p.sub_(stats[_LOG_SUM_S, rows, None])
            if need_mm:
                # dKL/ds = p - q; written straight into the gradient when it is fp32.
                out = grad_mm[rows] if grad_mm.dtype == torch.float32 else None
                grad_s = torch.exp(log_p, out=out).sub_(q).mul_(g)
                if out is None:
                    grad_mm[rows] = grad_s
                del grad_s
            if need_vm:
                # dKL/dz = q (log q - log p - KL)
                grad_z = log_q.sub_(log_p).sub_(stats[_KL, rows, None]).mul_(q).mul_(g)
                grad_vm[rows] = grad_z
                del grad_z
            del log_q, log_p, q
        return grad_mm, grad_vm, None, None


def visual_word_kl(
    mm_logits: torch.Tensor,
    vm_logits: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Per-position ``KL(softmax(vm_logits) || softmax(mm_logits))`` over the full vocabulary.

    Args:
        mm_logits: this rank's vocab shard ``[N, V/tp]`` of the multimodal head's logits, the
            prediction ``s``; any float dtype.
        vm_logits: the same vocab shard ``[N, V/tp]`` of the VM head's logits, the visual-word
            target ``z``; any float dtype (need not match ``mm_logits``). Detach it before the
            call to stop the target's gradient (``vm_target_grad=detach``); the backward then
            skips computing it.
        tp_group: the group holding the other vocab shards. None means megatron's tensor-model
            -parallel group when ``parallel_state`` is initialised, else unsharded inputs.
        chunk_size: positions processed at once, bounding the extra memory to about four fp32
            ``[chunk_size, V/tp]`` buffers. None picks ``DEFAULT_CHUNK_ELEMENTS // (V/tp)`` rows
            (524 at V/tp = 32000).

    Returns:
        ``[N]`` fp32, identical on every rank of ``tp_group``. fp32 whatever the input dtype:
        the KL is a loss averaged over thousands of positions and added to megatron's fp32
        cross-entropy, and rounding it to bf16 would cost ~3 significant digits for N floats
        of memory. Gradients flow back in each input's own dtype.
    """
    for name, logits in (("mm_logits", mm_logits), ("vm_logits", vm_logits)):
        if logits.dim() != 2:
            raise ValueError(
                f"{name} must be [positions, vocab shard], got shape {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {logits.dtype}")
    if mm_logits.shape != vm_logits.shape:
        raise ValueError(
            f"mm_logits {tuple(mm_logits.shape)} and vm_logits {tuple(vm_logits.shape)} must "
            "hold the same positions and the same vocab shard"
        )
    if mm_logits.device != vm_logits.device:
        raise ValueError(
            f"mm_logits is on {mm_logits.device} but vm_logits is on {vm_logits.device}"
        )
    vocab_shard = mm_logits.shape[1]
    if vocab_shard == 0:
        raise ValueError("mm_logits/vm_logits have an empty vocab shard (V/tp = 0)")
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocab_shard)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return VocabParallelVisualWordKL.apply(
        mm_logits, vm_logits, resolve_tp_group(tp_group), chunk_size
    )

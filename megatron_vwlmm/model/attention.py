"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``, as a megatron module.

megatron-core's local ``DotProductAttention`` (the ``core_attention`` of the non-TE layer
specs) writes the ``[b, np, s, s]`` scores, the softmax and the dropout mask to memory, repeats
the grouped K/V heads of GQA, and refuses packed sequences. ``SDPAttention`` keeps its
constructor and forward contract (``layer_spec.submodules.self_attention.submodules.
core_attention``, see ``model/specs.py``) and hands the maths to torch's fused kernel instead:
flash / memory-efficient attention on GPU, the fused flash kernel on CPU, never the ``s x s``
matrix in the backward pass, and grouped K/V read in place (``enable_gqa``). It has no
parameters, like the local ``DotProductAttention``, so checkpoints do not depend on the choice.

Numerics follow ``DotProductAttention`` exactly: the scale is ``softmax_scale`` or
``1/sqrt(kv_channels)``; ``apply_query_key_layer_scaling`` divides the scores by the layer
number before an fp32 softmax and multiplies them back inside it, which cancels, so the fused
kernel (fp32 accumulation) gets the plain scale; attention dropout is drawn inside megatron's
model-parallel RNG fork, so TP ranks drop independently as there.

Packed sequences (``packed_seq_params.qkv_format == "thd"``): documents are concatenated into
one row of ``t`` tokens and ``cu_seqlens_q`` ([n + 1], int32) delimits them; each token attends
causally within its own document only. Two kernels compute that mask:

* FlexAttention (CUDA, torch >= 2.5): a ``create_block_mask`` over a document-causal
  ``mask_mod``; blocks that cross documents are skipped, so the cost is ~sum(len_i^2), not t^2.
  ``flex_attention`` is compiled with ``torch.compile`` (its eager form is a slow reference
  and has no CPU backward).
* SDPA with a boolean ``[t, t]`` block-diagonal-causal mask: every device, attention dropout,
  and the path the other is tested against (``packed_kernel="sdpa"`` forces it).

Both masks come from the same document ids (``model/packing.py``) and are built once per forward
pass: layers share a small cache keyed by the ``cu_seqlens`` tensor itself (megatron hands the
same ``PackedSeqParams`` to every layer), so the host never reads ``cu_seqlens``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_vwlmm.model.packing import document_ids

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    create_block_mask = flex_attention = None

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)  # scaled_dot_product_attention(enable_gqa=...)
PACKED_KERNELS = ("auto", "flex", "sdpa")
_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.causal_bottom_right)
_MASKED_SCORE = -10000.0  # megatron's attention_mask_func fill value (transformer/utils.py)


# -- document masks (pure functions) ----------------------------------------------------------

def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[t, t] boolean, True where query i may attend to key j: same document and j <= i."""
    total = doc_ids.numel()
    causal = torch.ones(total, total, dtype=torch.bool, device=doc_ids.device).tril_()
    return causal & (doc_ids[:, None] == doc_ids[None, :])


def document_causal_mask_mod(doc_ids: torch.Tensor) -> Callable:
    """The same predicate as ``document_causal_mask``, as a FlexAttention ``mask_mod``."""

    def mask_mod(batch, head, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

    return mask_mod


class _PackCache:
    """Masks of the last few packs, keyed by the ``cu_seqlens`` tensor object and its version.

    Identity, not content: comparing contents would read the tensor on the host (a device sync
    per layer). Entries hold a reference, so a cached tensor's id is never reused."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.entries: list[tuple[torch.Tensor, int, tuple, Any]] = []

    def get(self, cu_seqlens: torch.Tensor, key: tuple, build: Callable[[], Any]) -> Any:
        for tensor, version, entry_key, value in self.entries:
            if tensor is cu_seqlens and version == cu_seqlens._version and entry_key == key:
                return value
        value = build()
        self.entries = [(cu_seqlens, cu_seqlens._version, key, value)] + self.entries
        del self.entries[self.size:]
        return value


_PACK_CACHE = _PackCache()
_COMPILED_FLEX: Optional[Callable] = None


def _flex_kernel(device: torch.device) -> Callable:
    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


# -- the module ---------------------------------------------------------------------------------

class SDPAttention(MegatronModule):
    """Drop-in ``core_attention``: same arguments and output layout as megatron's
    ``DotProductAttention`` (sbhd: q ``[sq, b, np, hn]``, k/v ``[sk, b, ng, hn]`` ->
    ``[sq, b, np * hn]``; thd: q ``[t, np, hn]``, k/v ``[t, ng, hn]`` -> ``[t, np * hn]``).

    ``np`` / ``ng`` are this TP rank's heads / query groups, read from the tensors (the caller
    has split them). ``packed_kernel`` picks the thd kernel ('auto': Flex on CUDA without
    dropout, else SDPA with a mask; 'flex'; 'sdpa'). Extra keyword arguments from newer
    megatron releases are accepted and ignored."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        packed_kernel: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPAttention: context parallelism needs TE attention")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"SDPAttention: softmax_type={config.softmax_type!r}")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            raise NotImplementedError("SDPAttention: sliding-window attention")
        if packed_kernel not in PACKED_KERNELS:
            raise ValueError(f"packed_kernel: {packed_kernel!r} is not one of {PACKED_KERNELS}")
        if packed_kernel == "flex" and flex_attention is None:
            raise RuntimeError("packed_kernel='flex' needs torch.nn.attention.flex_attention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.packed_kernel = packed_kernel
        head_dim = config.kv_channels  # DotProductAttention: projection_size / num_heads
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention_bias")
        dropout_p = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            out = self._packed(query, key, value, packed_seq_params, dropout_p)  # [1, np, t, hn]
            return out.squeeze(0).transpose(0, 1).reshape(query.size(0), -1)
        if packed_seq_params is not None:
            raise NotImplementedError(
                f"SDPAttention: packed qkv_format={packed_seq_params.qkv_format!r} (only 'thd')")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, sk = query.size(0), key.size(0)
        mask, is_causal = None, False
        if attention_mask is not None:  # megatron: True = masked out; used as given
            mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            mask.masked_fill_(attention_mask, _MASKED_SCORE)
        elif mask_type in _CAUSAL_TYPES and sq > 1:  # sq == 1: decoding, sees the whole cache
            if sq == sk:
                is_causal = True
            else:  # prefill against a longer cache: bottom-right aligned
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril_(sk - sq)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = self._sdpa(q, k, v, mask, is_causal, dropout_p)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, query.size(1), -1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """No parameters and no extra state (as the local ``DotProductAttention``)."""
        return {}

    # -- kernels ------------------------------------------------------------------------------

    def _sdpa(self, q, k, v, mask, is_causal: bool, dropout_p: float) -> torch.Tensor:
        gqa = {}
        groups = q.size(1) // k.size(1)
        if groups > 1 and SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, **gqa)

        if dropout_p == 0.0:
            return attend()
        if self.config.sequence_parallel:  # as DotProductAttention: no fork under SP
            return attend()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return attend()

    def _packed(self, query, key, value, params: PackedSeqParams, dropout_p: float):
        cu_seqlens = params.cu_seqlens_q_padded
        if cu_seqlens is None:
            cu_seqlens = params.cu_seqlens_q
        total = query.size(0)
        if key.size(0) != total:
            raise NotImplementedError("SDPAttention: thd cross-attention (t_q != t_kv)")
        # [t, n, hn] -> [1, n, t, hn]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        use_flex = self.packed_kernel == "flex" or (
            self.packed_kernel == "auto" and flex_attention is not None
            and query.is_cuda and dropout_p == 0.0)
        if use_flex:
            if dropout_p != 0.0:
                raise NotImplementedError("SDPAttention: FlexAttention has no attention dropout")
            block_mask = _PACK_CACHE.get(cu_seqlens, ("flex", total, q.device), lambda: (
                create_block_mask(
                    document_causal_mask_mod(document_ids(cu_seqlens.to(q.device), total)),
                    None, None, total, total, device=q.device)))
            kernel = _flex_kernel(query.device)
            return kernel(q, k, v, block_mask=block_mask, scale=self.softmax_scale,
                          enable_gqa=q.size(1) != k.size(1))
        mask = _PACK_CACHE.get(cu_seqlens, ("sdpa", total, q.device), lambda: (
            document_causal_mask(document_ids(cu_seqlens.to(q.device), total))))
        return self._sdpa(q, k, v, mask, False, dropout_p)

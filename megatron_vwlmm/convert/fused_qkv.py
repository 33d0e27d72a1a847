"""megatron-core's fused QKV tensor <-> Hugging Face's separate q/k/v projections.

megatron-core groups the fused QKV weight (and bias) per query group:
``[q heads of the group (num_heads/num_groups x d), k (d), v (d)]`` for each group; HF keeps
q, k and v apart. The language model's mapping (``hf_mapping.py``) and each vision encoder's
(``megatron_vwlmm/vision/hf_formats.py``) both convert through these two functions, so the
layout is written once, below both.
"""

from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_groups: int) -> torch.Tensor:
    """HF q/k/v (weight [out, in] or bias [out]) -> megatron's grouped QKV."""
    head_dim = k.shape[0] // num_groups
    per_group = num_heads // num_groups
    tail = q.shape[1:]
    q = q.reshape(num_groups, per_group * head_dim, *tail)
    k = k.reshape(num_groups, head_dim, *tail)
    v = v.reshape(num_groups, head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int):
    """megatron's grouped QKV -> HF (q, k, v)."""
    per_group = num_heads // num_groups
    head_dim = qkv.shape[0] // (num_groups * (per_group + 2))
    tail = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail))

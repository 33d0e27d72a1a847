"""Model FLOPs of one training step, counted per layer from the model config (for TFLOP/s, MFU).

Counts matmuls only (2 FLOPs per multiply-add), as Megatron-LM and the PaLM MFU definition do.
A part that is trained costs forward + 2x backward (activation and weight grads); a frozen part
that still back-propagates to an earlier trainable one (the LLM in stage 1 feeds the adapter's
gradient) costs forward + 1x backward; the frozen vision encoder costs its forward only. The
duplicate encoder/adapter the last pipeline stage runs for the VM target is implementation
overhead and is *not* counted (MFU measures useful model work).

Useful work only: the decoder is counted over the positions samples occupy (never padding), and
attention over each sample's own square (sum of squared sample lengths), which is what a packed
row computes per document and what an unpacked row would compute without its padding. The same
samples therefore have the same FLOPs padded or packed, and MFU compares the two honestly.
"""

from __future__ import annotations

from typing import Any, Optional

from vwlmm_data.encoders import get_encoder_kind


def decoder_forward_flops(cfg: Any, num_positions: int,
                          attention_square: Optional[int] = None) -> float:
    """Forward FLOPs of the LLM (attention, SwiGLU MLP, LM head) over ``num_positions``.

    ``attention_square``: sum over sequences of length^2 (None: one sequence of
    ``num_positions``). QK^T and AV are counted over each full (causally masked) square, as
    megatron counts them.
    """
    d = cfg.decoder
    h, t = d.hidden_size, num_positions
    square = t * t if attention_square is None else attention_square
    kv = h * d.num_query_groups // d.num_attention_heads
    per_token_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * 3 * h * d.ffn_hidden_size
    attention = 2 * 2 * square * h
    lm_head = 2 * t * h * d.vocab_size
    return d.num_layers * (per_token_layer * t + attention) + lm_head


def vision_forward_flops(cfg: Any) -> float:
    """Forward FLOPs of the ViT layers actually run, plus patch embedding, per image. The
    layers see the patches and the kind's class token (CLIP: one; SigLIP: none)."""
    v = cfg.vision
    n = v.num_patches + get_encoder_kind(v.kind).num_class_tokens
    hv = v.hidden_size
    per_layer = n * (2 * 4 * hv * hv + 2 * 2 * hv * v.ffn_hidden_size) + 2 * 2 * n * n * hv
    patch_embed = 2 * v.num_patches * 3 * v.patch_size ** 2 * hv
    return v.num_layers_run * per_layer + patch_embed


def adapter_forward_flops(cfg: Any) -> float:
    """mlp2x_gelu adapter per image (num_patches rows)."""
    h, hv = cfg.decoder.hidden_size, cfg.vision.hidden_size
    return cfg.num_patches * (2 * hv * h + 2 * h * h)


def vm_head_forward_flops(cfg: Any) -> float:
    """VM head logits on the image rows only (that is all the KL needs), per image."""
    return cfg.num_patches * 2 * cfg.decoder.hidden_size * cfg.decoder.vocab_size


def _mult(trained: bool, backprop_through: bool = True) -> int:
    return 3 if trained else (2 if backprop_through else 1)


def step_flops(cfg: Any, num_positions: int, attention_square: int, num_images: int) -> float:
    """Model FLOPs of one optimizer step: the whole global batch's samples occupy
    ``num_positions`` positions, ``attention_square`` = sum of their squared lengths."""
    decoder = decoder_forward_flops(cfg, num_positions, attention_square)
    decoder *= _mult(not cfg.freeze_decoder, backprop_through=not cfg.freeze_adapter)
    vision = vision_forward_flops(cfg) * num_images * _mult(not cfg.freeze_vision, False)
    adapter = adapter_forward_flops(cfg) * num_images * _mult(not cfg.freeze_adapter, False)
    vm_head = vm_head_forward_flops(cfg) * num_images * _mult(not cfg.freeze_vm_head)
    return float(decoder + vision + adapter + vm_head)

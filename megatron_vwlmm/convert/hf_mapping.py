"""Weight mapping between a full (unsharded) VW-LMM megatron state and Hugging Face modules.

Megatron names here are those of an unsharded ``VWLMMModel`` built with the local layer spec
(``language_model.*``, ``vision_model.*``, ``adapter.*``, ``vm_head.*``). Checkpoints carry the
Transformer Engine names for the two fused layer norms; ``canonical_megatron_name`` folds those
into the local names so both kinds map the same way.

The HF side is split by component so each maps onto a stock class:
- ``llm``: ``LlamaForCausalLM`` / ``MistralForCausalLM`` (``model.*``, ``lm_head.weight``)
- ``vision``: the kind's stock vision model (``CLIPVisionModel`` / ``SiglipVisionModel``, its
  own keys: ``embeddings.*``, ``encoder.*``); only the layers the encoder runs, mapped by
  ``megatron_vwlmm/vision/hf_formats.py``
- ``projector``: LLaVA's ``mlp2x_gelu`` as ``{0,2}.{weight,bias}`` (nn.Sequential indices)
- ``vm_head``: ``weight``

Layouts (megatron-core): the fused QKV weight is grouped per query group (``fused_qkv.py``); the
SwiGLU fc1 weight is ``[gate; up]``. HF keeps q/k/v and gate/up separate. Both RoPE conventions are
``rotate_half`` (HF Llama checkpoints are already permuted), so no permutation is needed.
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch

from megatron_vwlmm.convert.fused_qkv import fuse_qkv, split_qkv
from megatron_vwlmm.model.config import VWLMMConfig
from megatron_vwlmm.vision.hf_formats import hf_format

Tensors = Dict[str, torch.Tensor]

_TE_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def canonical_megatron_name(name: str) -> str:
    """Fold TE's fused-norm parameter names into the local spec's names."""
    for te_suffix, local_suffix in _TE_NORM_ALIASES.items():
        if name.endswith(te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name


# -- megatron -> HF ------------------------------------------------------------------------------

def megatron_to_hf(state: Mapping[str, torch.Tensor], config: VWLMMConfig) -> Dict[str, Tensors]:
    """Split a full megatron state into HF component state dicts (see module docstring)."""
    state = {canonical_megatron_name(k): v for k, v in state.items()}
    d, vis = config.decoder, config.vision
    out: Dict[str, Tensors] = {"llm": {}, "vision": {}, "projector": {}, "vm_head": {}}
    llm, vision = out["llm"], out["vision"]

    lm = "language_model."
    llm["model.embed_tokens.weight"] = state[lm + "embedding.word_embeddings.weight"]
    llm["model.norm.weight"] = state[lm + "decoder.final_layernorm.weight"]
    llm["lm_head.weight"] = state[lm + "output_layer.weight"]
    for i in range(d.num_layers):
        src, dst = f"{lm}decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(state[src + "self_attention.linear_qkv.weight"],
                            d.num_attention_heads, d.num_query_groups)
        llm[dst + "self_attn.q_proj.weight"] = q
        llm[dst + "self_attn.k_proj.weight"] = k
        llm[dst + "self_attn.v_proj.weight"] = v
        llm[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.linear_proj.weight"]
        gate, up = torch.chunk(state[src + "mlp.linear_fc1.weight"], 2, dim=0)
        llm[dst + "mlp.gate_proj.weight"] = gate
        llm[dst + "mlp.up_proj.weight"] = up
        llm[dst + "mlp.down_proj.weight"] = state[src + "mlp.linear_fc2.weight"]
        llm[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        llm[dst + "post_attention_layernorm.weight"] = state[src + "pre_mlp_layernorm.weight"]

    if "vision_model.conv1.weight" in state:
        vision.update(hf_format(vis.kind).to_hf(state, vis))
        for kind in ("weight", "bias"):
            out["projector"][f"0.{kind}"] = state[f"adapter.encoder.linear_fc1.{kind}"]
            out["projector"][f"2.{kind}"] = state[f"adapter.encoder.linear_fc2.{kind}"]
    if "vm_head.weight" in state:
        out["vm_head"]["weight"] = state["vm_head.weight"]
    return out


# -- HF -> megatron ------------------------------------------------------------------------------

def hf_to_megatron(components: Mapping[str, Mapping[str, torch.Tensor]],
                   config: VWLMMConfig) -> Tensors:
    """Inverse of ``megatron_to_hf``: HF component state dicts -> full megatron state.

    Vision layers beyond ``num_layers_run``, the final LayerNorm and SigLIP's pooling head are
    not part of the encoder (the adapter reads the ``feature_layer`` hidden state) and are
    ignored.
    """
    d, vis = config.decoder, config.vision
    llm = components["llm"]
    state: Tensors = {}
    lm = "language_model."
    state[lm + "embedding.word_embeddings.weight"] = llm["model.embed_tokens.weight"]
    state[lm + "decoder.final_layernorm.weight"] = llm["model.norm.weight"]
    state[lm + "output_layer.weight"] = llm["lm_head.weight"]
    for i in range(d.num_layers):
        src, dst = f"model.layers.{i}.", f"{lm}decoder.layers.{i}."
        state[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            llm[src + "self_attn.q_proj.weight"], llm[src + "self_attn.k_proj.weight"],
            llm[src + "self_attn.v_proj.weight"], d.num_attention_heads, d.num_query_groups)
        state[dst + "self_attention.linear_proj.weight"] = llm[src + "self_attn.o_proj.weight"]
        state[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [llm[src + "mlp.gate_proj.weight"], llm[src + "mlp.up_proj.weight"]], dim=0)
        state[dst + "mlp.linear_fc2.weight"] = llm[src + "mlp.down_proj.weight"]
        state[dst + "input_layernorm.weight"] = llm[src + "input_layernorm.weight"]
        state[dst + "pre_mlp_layernorm.weight"] = llm[src + "post_attention_layernorm.weight"]

    vision = components.get("vision") or {}
    if vision:
        state.update(hf_format(vis.kind).from_hf(vision, vis))
    projector = components.get("projector") or {}
    for kind in ("weight", "bias") if projector else ():
        state[f"adapter.encoder.linear_fc1.{kind}"] = projector[f"0.{kind}"]
        state[f"adapter.encoder.linear_fc2.{kind}"] = projector[f"2.{kind}"]
    vm_head = components.get("vm_head") or {}
    if vm_head:
        state["vm_head.weight"] = vm_head["weight"]
    return state

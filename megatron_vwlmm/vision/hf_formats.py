"""The Hugging Face side of each vision-encoder kind: its transformers config and weight names.

The vision tensors travel as the stock transformers vision model names them in memory
(``CLIPVisionModel`` / ``SiglipVisionModel``: ``embeddings.*``, ``encoder.layers.N.*``, then
``post_layernorm.*`` and SigLIP's pooling ``head.*``). Both kinds name their encoder layers
alike (``self_attn.{q,k,v,out}_proj``, ``layer_norm1/2``, ``mlp.fc1/fc2``), which map onto
megatron's layers the same way (fused QKV, pre-MLP LayerNorm); they differ in the embeddings:
CLIP has a class embedding, a bias-free patch convolution and a pre-LayerNorm (``pre_layrnorm``,
transformers' spelling), SigLIP a patch convolution with bias and neither of the others.

How LLaVA reads the encoder is part of the format too: stock ``LlavaForConditionalGeneration``
drops the first token under ``vision_feature_select_strategy="default"`` (CLIP's class token)
and keeps all under ``"full"`` (SigLIP, which has none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch

from megatron_vwlmm.convert.fused_qkv import fuse_qkv, split_qkv
from vwlmm_data.encoders import get_encoder_kind

Tensors = Dict[str, torch.Tensor]
MEGATRON_PREFIX = "vision_model."
# ``VisionConfig`` field -> the transformers vision-config field (both kinds name them alike).
_CONFIG_FIELDS = {
    "image_size": "image_size", "patch_size": "patch_size", "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads", "norm_epsilon": "layer_norm_eps",
}


def _layer_pairs(megatron: str, hf: str):
    """(megatron name, HF name) of one encoder layer's unfused tensors."""
    for kind in ("weight", "bias"):
        yield f"{megatron}self_attention.linear_proj.{kind}", f"{hf}self_attn.out_proj.{kind}"
        yield f"{megatron}input_layernorm.{kind}", f"{hf}layer_norm1.{kind}"
        yield f"{megatron}pre_mlp_layernorm.{kind}", f"{hf}layer_norm2.{kind}"
        yield f"{megatron}mlp.linear_fc1.{kind}", f"{hf}mlp.fc1.{kind}"
        yield f"{megatron}mlp.linear_fc2.{kind}", f"{hf}mlp.fc2.{kind}"


@dataclass(frozen=True)
class HFVisionFormat:
    """One kind's transformers vision model: config class, names, LLaVA's reading of it."""

    kind: str
    display_name: str
    config_class: str  # transformers class of the vision-only config
    model_types: tuple[str, ...]  # HF model_type: the vision-only config's, the two-tower one's
    hidden_act: str  # transformers' name of the activation the megatron tower computes
    llava_feature_strategy: str  # LLaVA's vision_feature_select_strategy
    # megatron name (under ``vision_model.``) -> HF name of the embedding-side tensors.
    embeddings: Mapping[str, str] = field(default_factory=dict)
    # The config switch saying the pooling head's weights are present (SigLIP), if any.
    head_switch: Optional[str] = None
    # Config fields sized like the hidden state (CLIP's unused projection_dim).
    hidden_sized_fields: tuple[str, ...] = ()
    # Published towers by hub name: their config, for LLaVA-layout checkpoints that only name
    # their tower (``mm_vision_tower``).
    known_towers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    # -- configs --------------------------------------------------------------------------------

    def hf_config(self, vision, *, with_head: bool = False):
        """The transformers vision config of ``vision`` (a ``VisionConfig``), at the source
        depth (``num_layers``). ``with_head``: the exported tensors include SigLIP's pooling
        head (an imported tower that had one); CLIP's config has no such switch."""
        import transformers

        fields = {hf: getattr(vision, ours) for ours, hf in _CONFIG_FIELDS.items()}
        fields["hidden_act"] = self.hidden_act
        fields.update({name: vision.hidden_size for name in self.hidden_sized_fields})
        if self.head_switch:
            fields[self.head_switch] = with_head
        return getattr(transformers, self.config_class)(**fields)

    def config_from_dict(self, fields: Mapping[str, Any]):
        """The vision config saved as a dict (``to_dict()``) back as its transformers class."""
        import transformers

        own = {k: v for k, v in fields.items() if k not in ("model_type", "transformers_version")}
        return getattr(transformers, self.config_class)(**own)

    def vision_config_of(self, config):
        """The vision-only config inside ``config`` (itself, or a two-tower config's
        ``vision_config``); None when ``config`` is not of this kind."""
        model_type = getattr(config, "model_type", None)
        if model_type == self.model_types[0]:
            return config
        if model_type in self.model_types[1:]:
            return config.vision_config
        return None

    def vision_fields(self, hf_vision, feature_layer: int) -> Dict[str, Any]:
        """``VisionConfig`` fields of a transformers vision config of this kind."""
        fields = {ours: getattr(hf_vision, hf) for ours, hf in _CONFIG_FIELDS.items()}
        fields["norm_epsilon"] = float(fields["norm_epsilon"])
        return {**fields, "feature_layer": feature_layer, "kind": self.kind}

    # -- weights --------------------------------------------------------------------------------

    def to_hf(self, state: Mapping[str, torch.Tensor], vision) -> Tensors:
        """The HF tensors of the layers the megatron encoder runs, from its (canonical-named)
        ``vision_model.*`` tensors (views, no copies)."""
        m = MEGATRON_PREFIX
        out = {hf: state[m + name] for name, hf in self.embeddings.items()}
        if "class_token" in self.embeddings:  # megatron [1, 1, d] (class_token_len 1), HF [d]
            out[self.embeddings["class_token"]] = state[m + "class_token"].reshape(-1)
        heads = vision.num_attention_heads
        for i in range(vision.num_layers_run):
            src, dst = f"{m}decoder.layers.{i}.", f"encoder.layers.{i}."
            for kind in ("weight", "bias"):
                q, k, v = split_qkv(state[f"{src}self_attention.linear_qkv.{kind}"], heads, heads)
                out[f"{dst}self_attn.q_proj.{kind}"] = q
                out[f"{dst}self_attn.k_proj.{kind}"] = k
                out[f"{dst}self_attn.v_proj.{kind}"] = v
            for megatron, hf in _layer_pairs(src, dst):
                out[hf] = state[megatron]
        return out

    def from_hf(self, tensors: Mapping[str, torch.Tensor], vision) -> Tensors:
        """Inverse of ``to_hf``: megatron ``vision_model.*`` tensors of the layers run (later
        layers, the final LayerNorm and any pooling head are not part of the encoder)."""
        m = MEGATRON_PREFIX
        out = {m + name: tensors[hf] for name, hf in self.embeddings.items()}
        if "class_token" in self.embeddings:
            out[m + "class_token"] = tensors[self.embeddings["class_token"]].reshape(1, 1, -1)
        heads = vision.num_attention_heads
        for i in range(vision.num_layers_run):
            src, dst = f"encoder.layers.{i}.", f"{m}decoder.layers.{i}."
            for kind in ("weight", "bias"):
                q, k, v = (tensors[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv")
                out[f"{dst}self_attention.linear_qkv.{kind}"] = fuse_qkv(q, k, v, heads, heads)
            for megatron, hf in _layer_pairs(dst, src):
                out[megatron] = tensors[hf]
        return out


_FORMATS = {
    "clip": HFVisionFormat(
        kind="clip", display_name="CLIP", config_class="CLIPVisionConfig",
        model_types=("clip_vision_model", "clip"), hidden_act="quick_gelu",
        llava_feature_strategy="default", hidden_sized_fields=("projection_dim",),
        embeddings={
            "class_token": "embeddings.class_embedding",
            "conv1.weight": "embeddings.patch_embedding.weight",
            "position_embeddings.weight": "embeddings.position_embedding.weight",
            "ln_pre.weight": "pre_layrnorm.weight",
            "ln_pre.bias": "pre_layrnorm.bias",
        },
        known_towers={
            "openai/clip-vit-large-patch14-336": dict(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, layer_norm_eps=1e-5,
                hidden_act="quick_gelu", projection_dim=768),
        },
    ),
    "siglip": HFVisionFormat(
        kind="siglip", display_name="SigLIP", config_class="SiglipVisionConfig",
        model_types=("siglip_vision_model", "siglip"), hidden_act="gelu_pytorch_tanh",
        llava_feature_strategy="full", head_switch="vision_use_head",
        embeddings={
            "conv1.weight": "embeddings.patch_embedding.weight",
            "conv1.bias": "embeddings.patch_embedding.bias",
            "position_embeddings.weight": "embeddings.position_embedding.weight",
        },
        known_towers={
            "google/siglip-so400m-patch14-384": dict(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                num_attention_heads=16, image_size=384, patch_size=14, layer_norm_eps=1e-6,
                hidden_act="gelu_pytorch_tanh", vision_use_head=True),
        },
    ),
}
HF_FORMATS = tuple(_FORMATS.values())


def hf_format(kind: str) -> HFVisionFormat:
    get_encoder_kind(kind)  # names the valid kinds when unknown
    return _FORMATS[kind]

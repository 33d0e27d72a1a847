"""The megatron side of each vision-encoder kind: how its tower is built and what it hands on.

Every kind is megatron-core's ``CLIPViTModel`` in one of its subtypes ('clip': class token,
pre-LayerNorm, patch convolution without bias; 'siglip': no class token, no pre-LayerNorm,
patch convolution with bias), with the layers from ``model/specs.py`` and the activation of the
kind. The encoder stops at the feature layer and LLaVA reads that layer's output as is, so the
final LayerNorm megatron's 'siglip' subtype builds after the last layer is replaced by
``IdentityOp`` (SigLIP's ``post_layernorm`` travels in the vision tail with the unused layers).

Adding a kind: an entry in ``encoders.py`` (data contract), a ``VisionTower`` here, an
``HFVisionFormat`` in ``hf_formats.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.transformer.identity_op import IdentityOp

from vwlmm_data.encoders import get_encoder_kind


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: SigLIP's ``gelu_pytorch_tanh`` in transformers."""
    return F.gelu(x, approximate="tanh")


@dataclass(frozen=True)
class VisionTower:
    kind: str
    model_subtype: str  # megatron CLIPViTModel's
    activation_func: Callable[[torch.Tensor], torch.Tensor]

    @property
    def transformer_fields(self) -> Mapping[str, Any]:
        """The ``TransformerConfig`` fields this kind sets (``config.vision_transformer_config``
        sets what every ViT shares)."""
        return {"activation_func": self.activation_func}

    def build(self, vision, transformer_config, layer_spec, norm_impl) -> CLIPViTModel:
        """The encoder of ``vision`` (a ``VisionConfig``): ``num_layers_run`` layers.

        megatron sizes the position table from ``img_h`` / ``patch_dim`` and requires them to
        divide; it is given the covered square (``grid_size * patch_size``), and the patch
        convolution drops any remainder of a larger input as transformers' does."""
        class_tokens = get_encoder_kind(self.kind).num_class_tokens
        covered = vision.grid_size * vision.patch_size
        return CLIPViTModel(
            transformer_config,
            layer_spec,
            ln_pre_impl=norm_impl,
            ln_post_impl=IdentityOp,
            add_class_token=class_tokens > 0,
            class_token_len=class_tokens,
            patch_dim=vision.patch_size,
            img_h=covered,
            img_w=covered,
            model_subtype=self.model_subtype,
        )

    def patch_features(self, encoder: CLIPViTModel, images: torch.Tensor) -> torch.Tensor:
        """The feature-layer hidden states of the patches, [N, num_patches, d_vis]."""
        hidden = encoder(images.to(encoder.conv1.weight.dtype))  # [N, tokens, d_vis]
        return hidden[:, get_encoder_kind(self.kind).num_class_tokens:]


_TOWERS = {
    "clip": VisionTower(kind="clip", model_subtype="clip", activation_func=quick_gelu),
    "siglip": VisionTower(kind="siglip", model_subtype="siglip", activation_func=gelu_tanh),
}


def get_tower(kind: str) -> VisionTower:
    get_encoder_kind(kind)  # names the valid kinds when unknown
    return _TOWERS[kind]

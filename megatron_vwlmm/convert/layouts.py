"""Key layouts of the two Hugging Face export formats, over ``hf_mapping``'s component dicts.

``hf_mapping`` speaks per-component HF names ({"llm", "vision", "projector", "vm_head"}); the
formats differ only in where each component sits:

- llava-hf (transformers ``LlavaForConditionalGeneration``, ``docs/ARCHITECTURE.md`` section 5):
  ``model.language_model.*``, ``lm_head.weight``, ``model.vision_tower.<CLIPVisionModel keys>``,
  ``model.multi_modal_projector.linear_{1,2}.*``, and ``vm_head.weight`` (read by
  ``VWLMMForConditionalGeneration``; the one key stock transformers reports as unexpected).
- original VW-LMM (MYTH-Lab checkpoints, ``vwLlamaForCausalLM``): ``model.*`` and ``lm_head``
  as in LlamaForCausalLM, ``model.vision_tower.vision_tower.vision_model.*``,
  ``model.mm_projector.{0,2}.*``, ``vm_head.weight``.

The vision component here holds the vision model's keys without the ``vision_model.`` prefix
(transformers 5 in-memory names, ``megatron_vwlmm/vision/hf_formats.py``); ``vision_keys``
normalises what is found on disk, for CLIP and SigLIP alike.
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch

Tensors = Dict[str, torch.Tensor]
Components = Dict[str, Tensors]

_LLAVA_PROJECTOR = {"0": "linear_1", "2": "linear_2"}
_ORIGINAL_VISION = "model.vision_tower.vision_tower.vision_model."


def vision_keys(state: Mapping[str, torch.Tensor]) -> Tensors:
    """Vision tensors under ``CLIPVisionModel``'s / ``SiglipVisionModel``'s in-memory names,
    from a vision-only or two-tower state (``vision_model.`` prefix stripped; text tower and
    projections dropped)."""
    out: Tensors = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            out[key[len("vision_model."):]] = value
        elif key.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.",
                             "head.")):
            out[key] = value
    return out


def split_vision_tail(vision: Mapping[str, torch.Tensor], layers_run: int) -> tuple[Tensors, Tensors]:
    """(tensors of the layers the encoder runs, the rest: later layers, post_layernorm and
    SigLIP's pooling head).

    The megatron encoder only has the layers up to the feature layer; the rest of the source
    tower is kept beside the checkpoint so exports carry it whole, bit-exactly.
    """
    head, tail = {}, {}
    for key, value in vision.items():
        if key.startswith("encoder.layers."):
            index = int(key.split(".")[2])
            (head if index < layers_run else tail)[key] = value
        elif key.startswith(("post_layernorm.", "head.")):
            tail[key] = value
        else:
            head[key] = value
    return head, tail


def identity_vision_tail(vision: Mapping[str, torch.Tensor], layers_run: int,
                         num_layers: int) -> Tensors:
    """Stand-in vision layers after the feature layer when the source tail is unknown (a model
    trained from scratch): out_proj and fc2 zeroed make each layer the identity on its residual
    stream, post_layernorm is the unit LayerNorm. The exported model's outputs never depend on
    these layers (the adapter reads an earlier hidden state), so logits stay exact. SigLIP's
    pooling head has no stand-in: such an export declares none (``vision_use_head`` false)."""
    tail: Tensors = {}
    for i in range(layers_run, num_layers):
        template = f"encoder.layers.{layers_run - 1}."
        for key, value in vision.items():
            if key.startswith(template):
                name = key[len(template):]
                zero = name.startswith(("self_attn.out_proj.", "mlp.fc2."))
                tail[f"encoder.layers.{i}.{name}"] = torch.zeros_like(value) if zero else value
    width = vision["embeddings.position_embedding.weight"][0]
    tail["post_layernorm.weight"] = torch.ones_like(width)
    tail["post_layernorm.bias"] = torch.zeros_like(width)
    return tail


# -- llava-hf ------------------------------------------------------------------------------------

def to_llava_hf(components: Mapping[str, Mapping[str, torch.Tensor]]) -> Tensors:
    out: Tensors = {}
    for key, value in components["llm"].items():
        out["lm_head.weight" if key == "lm_head.weight"
            else "model.language_model." + key[len("model."):]] = value
    for key, value in components["vision"].items():
        out["model.vision_tower." + key] = value
    for key, value in components["projector"].items():
        index, kind = key.split(".")
        out[f"model.multi_modal_projector.{_LLAVA_PROJECTOR[index]}.{kind}"] = value
    for key, value in (components.get("vm_head") or {}).items():
        out["vm_head." + key] = value
    return out


def from_llava_hf(state: Mapping[str, torch.Tensor]) -> Components:
    inverse = {v: k for k, v in _LLAVA_PROJECTOR.items()}
    out: Components = {"llm": {}, "vision": {}, "projector": {}, "vm_head": {}}
    for key, value in state.items():
        if key == "lm_head.weight":
            out["llm"][key] = value
        elif key.startswith("model.language_model."):
            out["llm"]["model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.vision_tower."):
            out["vision"][key[len("model.vision_tower."):]] = value
        elif key.startswith("model.multi_modal_projector."):
            name, kind = key.split(".")[-2:]
            out["projector"][f"{inverse[name]}.{kind}"] = value
        elif key.startswith("vm_head."):
            out["vm_head"][key[len("vm_head."):]] = value
    return out


# -- original VW-LMM -------------------------------------------------------------------------------

def to_original(components: Mapping[str, Mapping[str, torch.Tensor]]) -> Tensors:
    out: Tensors = dict(components["llm"])
    for key, value in components["vision"].items():
        out[_ORIGINAL_VISION + key] = value
    for key, value in components["projector"].items():
        out["model.mm_projector." + key] = value
    for key, value in (components.get("vm_head") or {}).items():
        out["vm_head." + key] = value
    return out


def from_original(state: Mapping[str, torch.Tensor]) -> Components:
    out: Components = {"llm": {}, "vision": {}, "projector": {}, "vm_head": {}}
    for key, value in state.items():
        if key.startswith(_ORIGINAL_VISION):
            out["vision"][key[len(_ORIGINAL_VISION):]] = value
        elif key.startswith("model.mm_projector."):
            out["projector"][key[len("model.mm_projector."):]] = value
        elif key.startswith("vm_head."):
            out["vm_head"][key[len("vm_head."):]] = value
        elif key.startswith("model.vision_tower."):
            continue  # e.g. position_ids buffers of older transformers
        else:
            out["llm"][key] = value
    return out

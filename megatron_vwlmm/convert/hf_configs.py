"""HF config objects equivalent to a ``VWLMMConfig`` (and back), for stock transformers classes."""

from __future__ import annotations

from typing import Optional

from megatron_vwlmm.model.config import VWLMMConfig


# Source-config fields that carry meaning beyond the tensor shapes (token ids, context length);
# kept from the imported model's config so an export describes the same model.
_KEPT_LLM_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def llm_hf_config(config: VWLMMConfig, architecture: str = "llama",
                  source: Optional[dict] = None, vocab_size: Optional[int] = None):
    """A ``LlamaConfig`` (or ``MistralConfig``, sliding window off) of the decoder.

    ``source``: the imported model's config dict, whose token ids and context length are kept;
    ``vocab_size`` overrides the decoder's (llava-hf adds the image token row)."""
    from transformers import LlamaConfig, MistralConfig

    d = config.decoder
    common = dict(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=d.ffn_hidden_size,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_query_groups,
        max_position_embeddings=max(d.seq_length, 4096),
        rms_norm_eps=d.norm_epsilon,  # explicit: transformers 5 defaults to 1e-6
        rope_theta=d.rotary_base,
        tie_word_embeddings=False,
        hidden_act="silu",
    )
    if vocab_size is not None:
        common["vocab_size"] = vocab_size
    for key in _KEPT_LLM_FIELDS:
        if source and source.get(key) is not None:
            common[key] = source[key]
    if architecture == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if architecture != "llama":
        raise ValueError(f"unknown decoder architecture {architecture!r} (llama, mistral)")
    return LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def vision_hf_config(config: VWLMMConfig, with_head: bool = False):
    """The transformers config of the vision encoder (``CLIPVisionConfig`` /
    ``SiglipVisionConfig`` by ``vision.kind``) with the source depth (``vision.num_layers``);
    ``with_head``: the tensors include SigLIP's pooling head."""
    from megatron_vwlmm.vision.hf_formats import hf_format

    return hf_format(config.vision.kind).hf_config(config.vision, with_head=with_head)


# -- HF -> VWLMMConfig ---------------------------------------------------------------------------

# model_type -> our decoder architecture name. Vicuna checkpoints are model_type "llama".
_DECODER_MODEL_TYPES = {"llama": "llama", "mistral": "mistral"}


class UnsupportedModelError(ValueError):
    """A source model this converter cannot map exactly (names the file and the field)."""


def decoder_architecture(llm_config, source: str = "the LLM config") -> str:
    """'llama' or 'mistral' for a HF causal-LM config; anything else is refused by name.

    Only features the megatron decoder reproduces exactly are accepted: plain RoPE (no
    scaling), no attention/MLP biases, SiLU.
    """
    model_type = getattr(llm_config, "model_type", None)
    arch = _DECODER_MODEL_TYPES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} (architectures "
            f"{getattr(llm_config, 'architectures', None)}) is not supported; vwlmm-convert "
            f"imports {sorted(_DECODER_MODEL_TYPES)} causal LMs (Llama, Vicuna, Mistral)")
    rope = _rope_parameters(llm_config)
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(
            f"{source}: rope_type {rope.get('rope_type')!r} (RoPE scaling) is not supported by "
            "the megatron decoder here; only plain RoPE converts exactly")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(llm_config, flag, False):
            raise UnsupportedModelError(f"{source}: {flag}=True is not supported (no biases)")
    act = getattr(llm_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (silu only)")
    return arch


def _rope_parameters(llm_config) -> dict:
    """RoPE settings as a dict in both transformers 4 (rope_theta) and 5 (rope_parameters)."""
    params = dict(getattr(llm_config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(llm_config, "rope_theta", None) is not None:
        params["rope_theta"] = llm_config.rope_theta
    scaling = getattr(llm_config, "rope_scaling", None)
    if scaling and "rope_type" not in params:
        params["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    return params


def vision_config_of(config, source: str = "the vision config"):
    """The vision-only config inside a (two-tower or vision-only) config of a supported encoder
    kind (``megatron_vwlmm/vision/hf_formats.py``: CLIP, SigLIP)."""
    from megatron_vwlmm.vision.hf_formats import HF_FORMATS

    for fmt in HF_FORMATS:
        vision = fmt.vision_config_of(config)
        if vision is not None:
            return vision
    raise UnsupportedModelError(
        f"{source}: model_type {getattr(config, 'model_type', None)!r} is " + "; ".join(
            f"not a {fmt.display_name} vision model ({', '.join(fmt.model_types)})"
            for fmt in HF_FORMATS))


def vision_format_of(config, source: str = "the vision config"):
    """The ``HFVisionFormat`` of a (two-tower or vision-only) vision config."""
    from megatron_vwlmm.vision.hf_formats import HF_FORMATS

    vision_config_of(config, source)  # refuses unsupported model types
    return next(fmt for fmt in HF_FORMATS if fmt.vision_config_of(config) is not None)


def vwlmm_config_from_hf(llm_config, vision_config, *, seq_length: Optional[int] = None,
                         feature_layer: int = -2, **changes) -> VWLMMConfig:
    """The ``VWLMMConfig`` of an HF decoder + vision encoder pair (shapes, RoPE theta, norm eps
    and the encoder kind taken from the source configs; ``changes`` override VW-LMM fields such
    as ``pif``)."""
    from megatron_vwlmm.model.config import DecoderConfig, VisionConfig

    rope = _rope_parameters(llm_config)
    window = getattr(llm_config, "sliding_window", None)
    length = seq_length or min(int(getattr(llm_config, "max_position_embeddings", 2048)), 4096)
    if window is not None and getattr(llm_config, "use_sliding_window", True) and window < length:
        raise UnsupportedModelError(
            f"sliding_window={window} is shorter than seq_length={length}; the megatron decoder "
            "attends to the whole sequence (LLaVA runs Mistral without a window). Pass a "
            "seq_length <= the window.")
    heads = llm_config.num_attention_heads
    decoder = DecoderConfig(
        num_layers=llm_config.num_hidden_layers,
        hidden_size=llm_config.hidden_size,
        ffn_hidden_size=llm_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(llm_config, "num_key_value_heads", None) or heads,
        vocab_size=llm_config.vocab_size,
        seq_length=length,
        rotary_base=float(rope.get("rope_theta", 10000.0)),
        norm_epsilon=float(llm_config.rms_norm_eps),
    )
    head_dim = getattr(llm_config, "head_dim", None)
    if head_dim not in (None, llm_config.hidden_size // heads):
        raise UnsupportedModelError(
            f"head_dim={head_dim} differs from hidden_size / num_attention_heads; not supported")
    fmt = vision_format_of(vision_config)
    act = getattr(vision_config, "hidden_act", fmt.hidden_act)
    if act != fmt.hidden_act:
        raise UnsupportedModelError(
            f"vision hidden_act {act!r}: only {fmt.display_name}'s {fmt.hidden_act} is supported")
    try:
        vision = VisionConfig(**fmt.vision_fields(vision_config, feature_layer))
    except ValueError as exc:
        raise UnsupportedModelError(f"the {fmt.display_name} vision config: {exc}") from exc
    changes.setdefault("name", "hf-import")
    return VWLMMConfig(decoder=decoder, vision=vision, **changes)


# -- export configs --------------------------------------------------------------------------------

def llava_hf_config(config: VWLMMConfig, architecture: str, *, image_token_index: int,
                    text_vocab_size: int, source: Optional[dict] = None,
                    vision_head: bool = False):
    """The ``LlavaConfig`` of an export (``docs/ARCHITECTURE.md`` section 5), plus the VW-LMM
    fields the ``VWLMMForConditionalGeneration`` subclass reads (stock transformers ignores
    them)."""
    from transformers import LlavaConfig

    from megatron_vwlmm.vision.hf_formats import hf_format

    llava = LlavaConfig(
        vision_config=vision_hf_config(config, with_head=vision_head),
        text_config=llm_hf_config(config, architecture, source, vocab_size=text_vocab_size),
        image_token_index=image_token_index,
        image_seq_length=config.num_patches,
        projector_hidden_act="gelu",
        vision_feature_layer=config.vision.feature_layer,
        # CLIP: "default" drops the class token; SigLIP: "full", it has none.
        vision_feature_select_strategy=hf_format(config.vision.kind).llava_feature_strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    llava.visual_word_vocab_size = config.decoder.vocab_size
    llava.pif = config.pif
    return llava


ORIGINAL_ARCHITECTURES = {
    ("llama", False): "vwLlamaForCausalLM",
    ("llama", True): "vwPifLlamaForCausalLM",
    ("mistral", False): "vwMistralForCausalLM",
}


def original_vwlmm_config(config: VWLMMConfig, architecture: str, *, mm_vision_tower: str,
                          source: Optional[dict] = None) -> dict:
    """config.json of the original VW-LMM layout (MYTH-Lab checkpoints; the authors' loader
    reads ``model_type`` "llava" with their own config class, so this is written as a dict).

    ``source``: the config.json of an imported original checkpoint; its fields are kept and
    only the model's shape and the multimodal fields are (re)written."""
    key = (architecture, bool(config.pif))
    if key not in ORIGINAL_ARCHITECTURES:
        raise UnsupportedModelError(
            f"the original VW-LMM code has no {architecture} model with pif={config.pif}")
    out = dict(source or {})
    if not source:
        out.update(llm_hf_config(config, architecture).to_dict())
        out.pop("rope_parameters", None)
    d = config.decoder
    out.update(
        model_type="llava",
        architectures=[ORIGINAL_ARCHITECTURES[key]],
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=d.ffn_hidden_size,
        num_hidden_layers=d.num_layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_query_groups,
        rms_norm_eps=d.norm_epsilon,
        rope_theta=d.rotary_base,
        mm_vision_tower=mm_vision_tower,
        mm_hidden_size=config.vision.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=config.vision.feature_layer,
        mm_vision_select_feature="patch",
        image_aspect_ratio=out.get("image_aspect_ratio", "pad"),
        mm_use_im_start_end=out.get("mm_use_im_start_end", False),
        mm_use_im_patch_token=out.get("mm_use_im_patch_token", False),
        use_mm_proj=True,
    )
    return out


# model_type of LLaVA-family configs: LLaVA-1.5 and VW-LMM write "llava" (their config class
# subclasses LlamaConfig or MistralConfig), later LLaVA releases "llava_llama" / "llava_mistral".
_ORIGINAL_MODEL_TYPES = {"llava": None, "llava_llama": "llama", "llava_mistral": "mistral",
                         "llama": "llama", "mistral": "mistral"}


def original_decoder_family(config: dict, source: str) -> str:
    """'llama' or 'mistral' for the config.json of a LLaVA-layout checkpoint (VW-LMM or LLaVA).

    Read from the config's fields, never from ``architectures``: VW-LMM's loader picks the class
    from the base model it is told, and both families write ``model_type`` "llava". A Mistral
    config always serialises ``sliding_window`` (transformers writes every field its class adds
    to ``PretrainedConfig``), a Llama config has no such field.
    """
    model_type = config.get("model_type")
    if model_type not in _ORIGINAL_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not a LLaVA-layout Llama / Mistral model "
            f"({sorted(_ORIGINAL_MODEL_TYPES)})")
    family = _ORIGINAL_MODEL_TYPES[model_type]
    if family is None:
        family = "mistral" if "sliding_window" in config else "llama"
    return family

"""HF config objects equivalent to a ``VWLMMConfig`` (and back), for stock transformers classes."""

from __future__ import annotations

from megatron_vwlmm.model.config import VWLMMConfig


def llm_hf_config(config: VWLMMConfig, architecture: str = "llama"):
    """A ``LlamaConfig`` (or ``MistralConfig``, sliding window off) of the decoder."""
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
    if architecture == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if architecture != "llama":
        raise ValueError(f"unknown decoder architecture {architecture!r} (llama, mistral)")
    return LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def clip_vision_hf_config(config: VWLMMConfig):
    """A ``CLIPVisionConfig`` with the source depth (``vision.num_layers``)."""
    from transformers import CLIPVisionConfig

    v = config.vision
    return CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.ffn_hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=v.norm_epsilon,
        projection_dim=v.hidden_size,
    )

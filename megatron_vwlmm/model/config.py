"""Typed configuration of a VW-LMM model and its presets.

Three groups, each a dataclass validated at construction: the decoder (a Llama/Vicuna/Mistral
LLM), the vision encoder (a ViT of one of the kinds in ``megatron_vwlmm/vision``: CLIP, SigLIP)
and the VW-LMM specifics (visual-word loss, PIF, what is frozen, layer implementation).
``decoder_transformer_config`` / ``vision_transformer_config`` / ``adapter_transformer_config``
turn them into megatron-core ``TransformerConfig`` objects, the one place where our fields meet
megatron's; ``RuntimeOptions`` carries how one job runs the model (recompute, interleaving,
FP8 recipe, loss normalisation), which no checkpoint records.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Optional

from vwlmm_data.contract import IGNORE_INDEX, IMAGE_TOKEN_ID  # noqa: F401  (re-exported)
from vwlmm_data.encoders import ENCODER_KINDS, get_encoder_kind

_VM_TARGET_GRAD = ("full", "detach")
_TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
# Core attention (``model/specs.py``): auto = TE's with the TE layers, else torch SDPA
# (``model/attention.py``); unfused = megatron's DotProductAttention, kept for comparison.
ATTENTION_BACKENDS = ("auto", "sdpa", "unfused")
_FP8_FORMATS = (None, "hybrid", "e4m3")
# megatron-core's ``Fp8Recipe`` values (megatron/core/enums.py), spelled here so that configs
# are read without importing megatron; a test keeps the two equal.
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise", "custom")


def _require(condition: bool, field_name: str, why: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {why}")


def _require_one_of(value: Any, choices: tuple, field_name: str) -> None:
    """``value`` in ``choices``, else an error that suggests the closest choice."""
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], 1)
    raise ValueError(f"{field_name}: {value!r} is not one of {choices}"
                     + (f"; did you mean {close[0]!r}?" if close else ""))


@dataclass(frozen=True)
class DecoderConfig:
    """A Llama-family decoder: RMSNorm, SwiGLU, RoPE, optional GQA, untied embeddings."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    seq_length: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "seq_length", "rotary_base", "norm_epsilon",
                     "init_method_std"):
            _require(getattr(self, name) > 0, f"decoder.{name}", "must be positive")
        _require(self.hidden_size % self.num_attention_heads == 0, "decoder.hidden_size",
                 f"{self.hidden_size} is not divisible by num_attention_heads "
                 f"{self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 "decoder.num_query_groups",
                 f"num_attention_heads {self.num_attention_heads} is not divisible by "
                 f"num_query_groups {self.num_query_groups}")


@dataclass(frozen=True)
class VisionConfig:
    """A ViT image encoder of ``kind`` ('clip' or 'siglip', ``megatron_vwlmm/vision``), which
    fixes the activation, the class token, the pixel normalisation and the HF format.

    ``num_layers`` is the source model's depth; ``feature_layer`` picks the hidden state fed to
    the adapter (-2: LLaVA's penultimate layer), so the encoder only builds
    ``num_layers + 1 + feature_layer`` layers. As in LLaVA, the adapter reads that layer's
    output as is (no final LayerNorm), patch tokens only (CLIP's class token is dropped).
    ``num_patches`` is ``(image_size // patch_size) ** 2``: a strip narrower than a patch is
    dropped by the patch convolution, where the kind allows it (SigLIP at 384 px, 14 px)."""

    image_size: int
    patch_size: int
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    feature_layer: int = -2
    norm_epsilon: float = 1e-5
    kind: str = "clip"

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "num_layers", "hidden_size", "ffn_hidden_size",
                     "num_attention_heads", "norm_epsilon"):
            _require(getattr(self, name) > 0, f"vision.{name}", "must be positive")
        _require_one_of(self.kind, tuple(ENCODER_KINDS), "vision.kind")
        grid_error = get_encoder_kind(self.kind).grid_error(self.image_size, self.patch_size)
        _require(grid_error is None, "vision.image_size", str(grid_error))
        _require(-self.num_layers <= self.feature_layer <= -1, "vision.feature_layer",
                 f"must be in [-{self.num_layers}, -1]")
        _require(self.hidden_size % self.num_attention_heads == 0, "vision.hidden_size",
                 "not divisible by num_attention_heads")

    @property
    def num_layers_run(self) -> int:
        return self.num_layers + 1 + self.feature_layer

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


@dataclass(frozen=True)
class VWLMMConfig:
    """The whole model. Loss: ``lm_loss + lambda_vm * vm_loss`` (paper Eq. 5/6)."""

    decoder: DecoderConfig
    vision: VisionConfig
    pif: bool = False
    lambda_vm: float = 1.0
    vm_target_grad: str = "full"
    freeze_vision: bool = True
    freeze_adapter: bool = False
    freeze_decoder: bool = False
    freeze_vm_head: bool = False
    image_token_id: int = IMAGE_TOKEN_ID
    transformer_impl: str = "auto"
    attention_backend: str = "auto"
    fp8: Optional[str] = None
    bf16: bool = False
    # Positions per chunk of the visual-word KL; None: sized from the vocab shard (bounded memory).
    kl_chunk_size: Optional[int] = None
    name: str = "custom"

    def __post_init__(self) -> None:
        _require_one_of(self.vm_target_grad, _VM_TARGET_GRAD, "vm_target_grad")
        _require_one_of(self.transformer_impl, _TRANSFORMER_IMPLS, "transformer_impl")
        _require_one_of(self.attention_backend, ATTENTION_BACKENDS, "attention_backend")
        _require_one_of(self.fp8, _FP8_FORMATS, "fp8")
        _require(self.lambda_vm >= 0, "lambda_vm", "must be >= 0")
        _require(self.image_token_id < 0, "image_token_id",
                 "must be negative (a placeholder outside the vocabulary)")
        _require(self.kl_chunk_size is None or self.kl_chunk_size > 0, "kl_chunk_size",
                 "must be positive (or None for automatic)")

    @property
    def num_patches(self) -> int:
        return self.vision.num_patches

    @property
    def params_dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    def validate(self, tp: int = 1, pp: int = 1, vpp: Optional[int] = None) -> None:
        """Check the model shape against a parallel layout; errors name the field and why."""
        d, v = self.decoder, self.vision
        _require(d.num_attention_heads % tp == 0, "decoder.num_attention_heads",
                 f"{d.num_attention_heads} heads are not divisible by tensor_parallel={tp}")
        _require(d.num_query_groups % tp == 0, "decoder.num_query_groups",
                 f"{d.num_query_groups} query groups are not divisible by tensor_parallel={tp}")
        _require(d.vocab_size % tp == 0, "decoder.vocab_size",
                 f"vocab {d.vocab_size} is not divisible by tensor_parallel={tp}")
        _require(d.ffn_hidden_size % tp == 0, "decoder.ffn_hidden_size",
                 f"{d.ffn_hidden_size} is not divisible by tensor_parallel={tp}")
        _require(v.num_attention_heads % tp == 0, "vision.num_attention_heads",
                 f"{v.num_attention_heads} heads are not divisible by tensor_parallel={tp}")
        stages = pp * (vpp or 1)
        _require(stages <= d.num_layers, "decoder.num_layers",
                 f"{d.num_layers} layers cannot fill {stages} pipeline stages "
                 f"(pipeline_parallel={pp} x virtual={vpp or 1})")
        _require(d.num_layers % stages == 0, "decoder.num_layers",
                 f"{d.num_layers} layers are not divisible by {stages} pipeline stages")


@dataclass(frozen=True)
class RuntimeOptions:
    """How one job runs a model, as opposed to what the model is: never saved with its weights
    (a checkpoint written with recompute loads without it, an export has no pipeline)."""

    recompute_granularity: Optional[str] = None  # None, "full" or "selective"
    recompute_method: Optional[str] = None  # "uniform" / "block" with "full"
    recompute_num_layers: Optional[int] = None
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    # Recompute every layer of a trainable vision tower in backward (megatron's full, uniform,
    # one layer at a time); a frozen tower runs without autograd and keeps nothing anyway.
    recompute_vision: bool = False
    fp8_recipe: Optional[str] = None
    # megatron's schedules leave the loss unaveraged and DDP leaves gradients unscaled by DP:
    # the per-token loss is normalised by the global batch's totals (model/forward_step.py).
    calculate_per_token_loss: bool = False

    def recompute_fields(self) -> dict[str, Any]:
        fields = {"recompute_granularity": self.recompute_granularity}
        if self.recompute_granularity == "full":
            fields.update(recompute_method=self.recompute_method,
                          recompute_num_layers=self.recompute_num_layers or 1)
        return {k: v for k, v in fields.items() if v is not None}

    def vision_fields(self) -> dict[str, Any]:
        if not self.recompute_vision:
            return {}
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)

    def decoder_fields(self) -> dict[str, Any]:
        fields = dict(self.recompute_fields(), sequence_parallel=self.sequence_parallel,
                      calculate_per_token_loss=self.calculate_per_token_loss)
        if self.virtual_pipeline_model_parallel_size:
            fields["virtual_pipeline_model_parallel_size"] = \
                self.virtual_pipeline_model_parallel_size
        if self.fp8_recipe is not None:
            fields["fp8_recipe"] = self.fp8_recipe
        return fields


def replace(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that accepts dotted names for nested fields ('decoder.vocab_size')."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **flat)


# ---------------------------------------------------------------------------------------------
# megatron TransformerConfig builders
# ---------------------------------------------------------------------------------------------

def _parallel_fields() -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    initialised = ps.model_parallel_is_initialized()
    return dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size() if initialised else 1,
        pipeline_model_parallel_size=(
            ps.get_pipeline_model_parallel_world_size() if initialised else 1
        ),
    )


def _common_fields(config: VWLMMConfig) -> dict[str, Any]:
    import torch

    on_gpu = torch.cuda.is_available()
    return dict(
        params_dtype=config.params_dtype,
        bf16=config.bf16,
        pipeline_dtype=config.params_dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fusions need CUDA kernels (or apex/TE); the unfused paths are numerically the reference.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        # Same full weights whatever the TP size (init on CPU, then split): layouts comparable.
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        batch_p2p_comm=on_gpu,
    )


def decoder_transformer_config(config: VWLMMConfig, runtime: Optional[RuntimeOptions] = None):
    """The decoder's megatron ``TransformerConfig`` (Llama style)."""
    import torch
    from megatron.core.transformer import TransformerConfig

    d = config.decoder
    fields: dict[str, Any] = dict(
        num_layers=d.num_layers,
        hidden_size=d.hidden_size,
        ffn_hidden_size=d.ffn_hidden_size,
        num_attention_heads=d.num_attention_heads,
        num_query_groups=d.num_query_groups,
        kv_channels=d.hidden_size // d.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=d.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=d.init_method_std,
        **_parallel_fields(),
        **_common_fields(config),
    )
    if config.fp8:
        fields.update(fp8=config.fp8)
    fields.update((runtime or RuntimeOptions()).decoder_fields())
    return TransformerConfig(**fields)


def vision_transformer_config(config: VWLMMConfig, runtime: Optional[RuntimeOptions] = None):
    """The ViT's ``TransformerConfig``: pre-LayerNorm layers with biases everywhere, plus what
    its kind sets (the MLP activation: CLIP's quick-GELU, SigLIP's tanh GELU).

    The vision encoder is never pipeline-split (it lives with the stages that need it) nor
    sequence-parallel (it runs on the image rows); of the runtime options only its own
    recompute (``recompute_vision``) applies to it."""
    from megatron.core.transformer import TransformerConfig

    from megatron_vwlmm.vision.towers import get_tower

    v = config.vision
    fields = dict(
        num_layers=v.num_layers_run,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_attention_heads,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=v.norm_epsilon,
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        **get_tower(v.kind).transformer_fields,
        **_common_fields(config),
    )
    fields.update(_parallel_fields())
    fields["pipeline_model_parallel_size"] = 1
    fields.update((runtime or RuntimeOptions()).vision_fields())
    return TransformerConfig(**fields)


def adapter_transformer_config(config: VWLMMConfig):
    """Config for the ``mlp2x_gelu`` adapter (Linear(d_vis, h), GELU, Linear(h, h))."""
    import torch
    from megatron.core.transformer import TransformerConfig

    # megatron's MLP maps input_size -> ffn_hidden_size -> hidden_size.
    fields = dict(
        num_layers=1,
        hidden_size=config.decoder.hidden_size,
        ffn_hidden_size=config.decoder.hidden_size,
        num_attention_heads=config.decoder.num_attention_heads,
        gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu,
        add_bias_linear=True,
        **_common_fields(config),
    )
    fields.update(_parallel_fields())
    fields["pipeline_model_parallel_size"] = 1
    return TransformerConfig(**fields)


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

CLIP_VIT_L_14_336 = VisionConfig(
    image_size=336, patch_size=14, num_layers=24, hidden_size=1024, ffn_hidden_size=4096,
    num_attention_heads=16, feature_layer=-2, norm_epsilon=1e-5,
)
TINY_VISION = VisionConfig(
    image_size=32, patch_size=8, num_layers=3, hidden_size=32, ffn_hidden_size=64,
    num_attention_heads=4, feature_layer=-2, norm_epsilon=1e-5,
)
# google/siglip-so400m-patch14-384 (LLaVA-OneVision's encoder): 27 x 27 patches of 14 px (the
# last 6 px of the 384 px image fall outside the grid), LLaVA's penultimate layer.
SIGLIP_SO400M_14_384 = VisionConfig(
    image_size=384, patch_size=14, num_layers=27, hidden_size=1152, ffn_hidden_size=4304,
    num_attention_heads=16, feature_layer=-2, norm_epsilon=1e-6, kind="siglip",
)
TINY_SIGLIP = VisionConfig(
    image_size=32, patch_size=8, num_layers=3, hidden_size=32, ffn_hidden_size=64,
    num_attention_heads=4, feature_layer=-2, norm_epsilon=1e-6, kind="siglip",
)

_DECODERS = {
    # Vicuna-7B v1.5 == Llama-2-7B shape.
    "vicuna-7b": DecoderConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
        num_query_groups=32, vocab_size=32000, seq_length=2048, rotary_base=10000.0,
        norm_epsilon=1e-5,
    ),
    # Mistral-7B-Instruct-v0.2, VW-LMM's Mistral base: GQA (8 KV heads), RoPE base 1e6, no
    # sliding window (LLaVA trains without one).
    "mistral-7b": DecoderConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=32000, seq_length=2048, rotary_base=1000000.0,
        norm_epsilon=1e-5,
    ),
    # Tests and the demo: the real 32000-piece tokenizer, a few-MB model, GQA on.
    "tiny": DecoderConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, vocab_size=32000, seq_length=256, rotary_base=10000.0,
        norm_epsilon=1e-5,
    ),
}

_VISIONS = {"clip-vit-l-14-336": CLIP_VIT_L_14_336, "tiny": TINY_VISION,
            "siglip-so400m-patch14-384": SIGLIP_SO400M_14_384, "tiny-siglip": TINY_SIGLIP}


def get_preset(name: str, vision: Optional[str] = None, **changes: Any) -> VWLMMConfig:
    """A named preset ('tiny', 'vicuna-7b', 'mistral-7b'); ``vision`` picks the encoder preset
    (``VISION_PRESETS``; default 'clip-vit-l-14-336' for the 7B decoders, 'tiny' for tiny, and
    'siglip-so400m-patch14-384' / 'tiny-siglip' for SigLIP). Dotted ``changes`` override."""
    if name not in _DECODERS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(_DECODERS)}")
    vision = vision or ("tiny" if name == "tiny" else "clip-vit-l-14-336")
    if vision not in _VISIONS:
        raise ValueError(f"unknown vision preset {vision!r}; choose from {sorted(_VISIONS)}")
    config = VWLMMConfig(decoder=_DECODERS[name], vision=_VISIONS[vision], name=name)
    return replace(config, **changes) if changes else config


PRESETS = tuple(_DECODERS)
VISION_PRESETS = tuple(_VISIONS)
__all__ = [
    "DecoderConfig", "VisionConfig", "VWLMMConfig", "get_preset", "replace", "PRESETS",
    "VISION_PRESETS", "IMAGE_TOKEN_ID", "IGNORE_INDEX", "decoder_transformer_config",
    "vision_transformer_config", "adapter_transformer_config",
]

"""Layer implementations as data (megatron ``ModuleSpec``): Transformer Engine or local.

Transformer Engine is chosen when it imports (GPU hosts; required for FP8); megatron-core's
local modules otherwise (CPU CI). Model code never names a layer class: it builds from these.
The core attention is a second, independent choice (``VWLMMConfig.attention_backend``): TE's
fused attention with the TE layers, torch SDPA (``model/attention.py``) with the local ones,
or megatron's unfused ``DotProductAttention`` in either, for comparison. SDPA and the unfused
attention have no parameters or extra state, so switching between them never changes checkpoint
keys (TE's attention adds an ``_extra_state`` entry of its own).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from typing import Optional, Union

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megatron_vwlmm.model.attention import SDPAttention
from megatron_vwlmm.model.config import ATTENTION_BACKENDS, VWLMMConfig


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_impl(config: VWLMMConfig) -> str:
    """'transformer_engine' or 'local', failing clearly when TE or FP8 is asked for without TE."""
    have_te = transformer_engine_available()
    if config.fp8 and not have_te:
        raise RuntimeError(
            f"fp8={config.fp8!r} needs NVIDIA Transformer Engine, which is not importable here. "
            "Install it on a GPU host (pip install -e .[gpu]) or drop the fp8 option."
        )
    if config.transformer_impl == "transformer_engine" and not have_te:
        raise RuntimeError(
            "transformer_impl='transformer_engine' but transformer_engine is not importable; "
            "use transformer_impl='local' or install it (pip install -e .[gpu])."
        )
    if config.transformer_impl == "auto":
        return "transformer_engine" if have_te else "local"
    return config.transformer_impl


def core_attention(impl: str, attention_backend: str = "auto"):
    """The ``core_attention`` class for layers of ``impl`` under ``attention_backend`` ('auto',
    'sdpa', 'unfused'); None keeps the layer spec's own (TE's with 'auto' and the TE layers)."""
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend: {attention_backend!r} is not one of "
                         f"{ATTENTION_BACKENDS}")
    if attention_backend == "unfused":
        return DotProductAttention
    if attention_backend == "sdpa" or impl != "transformer_engine":
        return SDPAttention
    return None


def with_core_attention(layer_spec: ModuleSpec, core_attention_cls) -> ModuleSpec:
    """A copy of a ``TransformerLayer`` spec whose self-attention uses ``core_attention_cls``
    (megatron's ``Attention`` calls it with ``DotProductAttention``'s arguments)."""
    if core_attention_cls is None:
        return layer_spec
    attention = layer_spec.submodules.self_attention
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules, core_attention=core_attention_cls))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, self_attention=attention))


def without_sequence_parallel(config):
    """A shallow copy of a megatron config with ``sequence_parallel`` off, for a module outside
    the sequence-parallel region (megatron's modules read the flag from their config)."""
    plain = copy.copy(config)
    plain.sequence_parallel = False
    return plain


class SequenceParallelTorchNorm:
    """megatron's ``WrappedTorchNorm`` (torch's RMSNorm / LayerNorm) usable under sequence
    parallelism, for the local (non-TE) layers.

    Under sequence parallelism each TP rank normalises its own slice of the sequence with the
    same (replicated) weights, so each rank's weight gradient is a partial sum over its
    positions. megatron's ``finalize_model_grads`` sums the gradients of parameters flagged
    ``sequence_parallel`` over the TP group, as it does for TE's and apex's norms, which flag
    themselves; torch's norms do not, and megatron's wrapper refuses sequence parallelism for
    that reason. The module itself is torch's, so checkpoint keys do not change.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        # Past the wrapper's own check; the weights get the flag below instead.
        norm = WrappedTorchNorm(without_sequence_parallel(config), hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def decoder_layer_spec(impl: str, attention_backend: str = "auto") -> ModuleSpec:
    from megatron.core.models.gpt import gpt_layer_specs

    if impl == "transformer_engine":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, input_layernorm=SequenceParallelTorchNorm,
            pre_mlp_layernorm=SequenceParallelTorchNorm))
    return with_core_attention(spec, core_attention(impl, attention_backend))


def decoder_block_spec(impl: str, attention_backend: str, config,
                       vp_stage: Optional[int] = None) -> Union[ModuleSpec,
                                                                 TransformerBlockSubmodules]:
    """The decoder block of one pipeline chunk: its layers and its final norm. With TE,
    megatron's block picks TE's norm itself; the local layers get
    ``SequenceParallelTorchNorm`` for the final norm too (megatron would pick its wrapper)."""
    layer = decoder_layer_spec(impl, attention_backend)
    if impl == "transformer_engine":
        return layer
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=SequenceParallelTorchNorm)


def vision_layer_spec(impl: str, attention_backend: str = "auto") -> ModuleSpec:
    """ViT layer (CLIP and SigLIP alike): bidirectional attention (no mask).

    megatron-core's own local ViT spec asks for a causal mask, which is wrong for a ViT, so the
    local variant is spelled out here; the TE spec is megatron's."""
    if impl == "transformer_engine":
        from megatron.core.models.vision.vit_layer_specs import (
            get_vit_layer_with_transformer_engine_spec,
        )

        spec = get_vit_layer_with_transformer_engine_spec()
        return with_core_attention(spec, core_attention(impl, attention_backend))
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention(impl, attention_backend),
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=mlp_spec("local"),
            mlp_bda=get_bias_dropout_add,
            # Checkpoint keys as the TE layers name them, so GPU (TE) and CPU (local) runs share
            # checkpoints (megatron's local GPT spec does the same).
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def mlp_spec(impl: str) -> ModuleSpec:
    """Two-layer MLP (column- then row-parallel): the ViT MLP and the ``mlp2x_gelu`` adapter."""
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TERowParallelLinear,
        )

        return ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear
            ),
        )
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )


def vision_norm_impl(impl: str):
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return WrappedTorchNorm

"""Model config validation: errors name the field and say why."""

from __future__ import annotations

import pytest

from megatron_vwlmm.model import get_preset
from megatron_vwlmm.model.config import replace
from megatron_vwlmm.model.specs import resolve_impl, transformer_engine_available


def test_presets_have_the_published_shapes():
    vicuna, mistral = get_preset("vicuna-7b"), get_preset("mistral-7b")
    assert vicuna.decoder.num_query_groups == 32 and mistral.decoder.num_query_groups == 8
    assert vicuna.num_patches == 576 and vicuna.vision.num_layers_run == 23
    assert get_preset("tiny").decoder.vocab_size == 32000


@pytest.mark.parametrize("changes, tp, pp, message", [
    ({}, 3, 1, "decoder.num_attention_heads: 4 heads are not divisible by tensor_parallel=3"),
    ({"decoder.num_attention_heads": 8, "decoder.num_query_groups": 2}, 4, 1,
     "decoder.num_query_groups: 2 query groups are not divisible by tensor_parallel=4"),
    ({"decoder.vocab_size": 32001}, 2, 1, "decoder.vocab_size: vocab 32001 is not divisible"),
    ({}, 1, 8, "decoder.num_layers: 4 layers cannot fill 8 pipeline stages"),
    ({}, 1, 3, "decoder.num_layers: 4 layers are not divisible by 3 pipeline stages"),
])
def test_validate_rejects_layouts(changes, tp, pp, message):
    config = get_preset("tiny", **changes)
    with pytest.raises(ValueError, match=message):
        config.validate(tp=tp, pp=pp)


@pytest.mark.parametrize("changes, message", [
    ({"vm_target_grad": "stop"}, "vm_target_grad: 'stop' is not one of"),
    ({"fp8": "e5m2"}, "fp8: 'e5m2' is not one of"),
    ({"decoder.num_query_groups": 3}, "decoder.num_query_groups: num_attention_heads 4"),
    ({"vision.image_size": 33}, "vision.image_size: 33 is not divisible by patch_size 8"),
    ({"image_token_id": 5}, "image_token_id: must be negative"),
])
def test_invalid_fields_fail_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(get_preset("tiny"), **changes)


@pytest.mark.skipif(transformer_engine_available(), reason="TE installed: FP8 is allowed")
def test_fp8_without_transformer_engine_says_so():
    with pytest.raises(RuntimeError, match="fp8='hybrid' needs NVIDIA Transformer Engine"):
        resolve_impl(get_preset("tiny", fp8="hybrid"))
    with pytest.raises(RuntimeError, match="transformer_engine is not importable"):
        resolve_impl(get_preset("tiny", transformer_impl="transformer_engine"))
    assert resolve_impl(get_preset("tiny")) == "local"

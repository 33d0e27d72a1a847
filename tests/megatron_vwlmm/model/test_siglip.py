"""The SigLIP encoder kind: our megatron tower's image features equal transformers'
``SiglipVisionModel`` hidden states (random tiny weights, imported through our HF mapping), its
FLOPs formula equals torch's count, and the vision seam covers every kind."""

from __future__ import annotations

import pytest
import torch

from tests.megatron_vwlmm.siglip_run import FEATURE_LAYERS


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("feature_layer", FEATURE_LAYERS)
def test_image_features_match_transformers_siglip(siglip_run, feature_layer):
    result = siglip_run[1]["features"][feature_layer]
    ours, reference = result["ours"], result["reference"]
    assert ours.shape == reference.shape == (3, 16, 32)  # all 4 x 4 patches, no class token
    assert _rel(ours, reference) <= 1e-5


@pytest.mark.parametrize("feature_layer", FEATURE_LAYERS)
def test_vision_mapping_round_trips_the_layers_run(siglip_run, feature_layer):
    result = siglip_run[1]["features"][feature_layer]
    assert result["round_trip_exact"]
    layers = {k.split(".")[2] for k in result["round_trip_keys"] if k.startswith("encoder.")}
    assert layers == {str(i) for i in range(3 + 1 + feature_layer)}
    assert not any(k.startswith(("post_layernorm.", "head.")) for k in result["round_trip_keys"])


def test_flops_formula_matches_torch_count(siglip_run):
    for feature_layer in FEATURE_LAYERS:
        measured, formula = siglip_run[1]["features"][feature_layer]["flops"]
        assert abs(measured - formula) / measured < 1e-3, (feature_layer, measured, formula)


def test_every_encoder_kind_has_a_tower_and_an_hf_format():
    from vwlmm_data.encoders import ENCODER_KINDS
    from megatron_vwlmm.vision.hf_formats import HF_FORMATS, hf_format
    from megatron_vwlmm.vision.towers import get_tower

    assert {"clip", "siglip"} <= set(ENCODER_KINDS)
    assert [f.kind for f in HF_FORMATS] == list(ENCODER_KINDS)
    for kind in ENCODER_KINDS:
        assert get_tower(kind).kind == hf_format(kind).kind == kind
    with pytest.raises(ValueError, match="unknown vision encoder 'dino'"):
        get_tower("dino")


def test_siglip_presets_have_the_published_shapes():
    from megatron_vwlmm.model import get_preset
    from megatron_vwlmm.model.config import VISION_PRESETS
    from megatron_vwlmm.vision.hf_formats import hf_format

    assert {"siglip-so400m-patch14-384", "tiny-siglip"} <= set(VISION_PRESETS)
    so400m = get_preset("vicuna-7b", vision="siglip-so400m-patch14-384")
    assert so400m.vision.kind == "siglip" and so400m.num_patches == 27 * 27
    assert so400m.vision.num_layers_run == 26
    # The preset is the published tower the importer knows by name.
    known = hf_format("siglip").known_towers["google/siglip-so400m-patch14-384"]
    ours = hf_format("siglip").hf_config(so400m.vision).to_dict()
    assert {k: ours[k] for k in known if k != "vision_use_head"} == \
        {k: v for k, v in known.items() if k != "vision_use_head"}
    assert get_preset("tiny", vision="tiny-siglip").vision.kind == "siglip"


def test_grid_rule_follows_the_kind():
    from megatron_vwlmm.model import get_preset

    # SigLIP drops a strip narrower than a patch (as transformers' patch convolution does);
    # a CLIP grid must divide (existing CLIP towers all do, a remainder is a typo).
    assert get_preset("tiny", vision="tiny-siglip", **{"vision.image_size": 36}).num_patches == 16
    with pytest.raises(ValueError, match="vision.image_size: 36 is not divisible by patch_size 8"):
        get_preset("tiny", **{"vision.image_size": 36})
    with pytest.raises(ValueError, match="vision.kind: 'dino' is not one of"):
        get_preset("tiny", **{"vision.kind": "dino"})


"""A SigLIP tower through the converters (the run: ``tests/megatron_vwlmm/siglip_run.py``): a
LLaVA-layout VW-LMM with a SigLIP tower imports and exports back bit-exactly; an LLM + SigLIP
import exports to llava-hf that stock transformers loads with the whole tower (pooling head
included), whose logits and visual-word KL equal megatron's, and whose processor normalises and
counts image tokens the SigLIP way."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.megatron_vwlmm.convert import fixtures as fx


def _tensors(folder: Path):
    from megatron_vwlmm.convert.hf_io import read_hf_tensors

    return dict(read_hf_tensors(folder))


def test_llava_layout_with_siglip_round_trips_exactly(siglip_run):
    root, _ = siglip_run
    source, exported = _tensors(root / "vwlmm_siglip"), _tensors(root / "original_export")
    assert set(exported) == set(source)
    tower = "model.vision_tower.vision_tower.vision_model."
    assert {tower + "head.probe", tower + "post_layernorm.weight",
            tower + "encoder.layers.2.mlp.fc2.bias"} <= set(source)
    different = [k for k in source if not torch.equal(source[k], exported[k])]
    assert not different, different[:5]
    config = json.loads((root / "original_export" / "config.json").read_text())
    assert config["mm_vision_tower"] == str(root / "siglip")


def test_vwlmm_export_from_scratch_writes_the_siglip_tower_beside_it(siglip_run):
    """With no source tower to name, the VW-LMM export writes the tower folder (the layers run,
    identity stand-ins after them, no pooling head) and records its config, from which an
    import rebuilds it; a known hub tower name works too."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from megatron_vwlmm.convert.importer import _original_vision_config

    root, _ = siglip_run
    export = root / "scratch_export"
    config = json.loads((export / "config.json").read_text())
    assert config["mm_vision_tower"] == str(export / "vision_tower")
    tower, info = SiglipVisionModel.from_pretrained(export / "vision_tower",
                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert tower.config.vision_use_head is False
    source = fx.siglip_vision_model().state_dict()
    ours = tower.state_dict()
    assert all(torch.equal(ours[k], source[k]) for k in ours if not k.startswith(
        ("encoder.layers.2.", "post_layernorm.")))  # the layers run: exact
    assert not ours["encoder.layers.2.mlp.fc2.weight"].any()  # a stand-in: the identity
    config["mm_vision_tower"] = "not/a-local-folder"
    rebuilt = _original_vision_config(config, export, None)
    assert isinstance(rebuilt, SiglipVisionConfig)
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "image_size", "patch_size", "layer_norm_eps", "hidden_act", "vision_use_head"):
        assert getattr(rebuilt, name) == getattr(tower.config, name), name
    del config["vwlmm_vision_config"]
    config["mm_vision_tower"] = "google/siglip-so400m-patch14-384"
    assert _original_vision_config(config, export, None).hidden_size == 1152


def test_llava_hf_export_holds_the_whole_siglip_tower(siglip_run):
    from transformers import LlavaForConditionalGeneration

    root, _ = siglip_run
    export = root / "llava_export"
    config = json.loads((export / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["vision_config"]["vision_use_head"] is True
    assert config["vision_feature_select_strategy"] == "full"  # no class token to drop
    model, info = LlavaForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert list(info["missing_keys"]) == [] and set(info["unexpected_keys"]) == {"vm_head.weight"}
    tower = model.model.vision_tower.state_dict()
    source = fx.siglip_vision_model().state_dict()
    assert set(tower) == set(source)
    different = [k for k in source if not torch.equal(tower[k], source[k])]
    assert not different, different[:5]


def test_stock_llava_logits_and_visual_word_kl_match_megatron(siglip_run):
    root, results = siglip_run
    megatron = results["megatron"]
    b = fx.batch()
    logits, z, kl = fx.llava_export_outputs(root / "llava_export", b)
    ours = megatron["logits"]
    assert float((logits - ours).norm() / ours.norm()) <= 1e-5
    assert z.shape == (b.images.shape[0], 16, fx.VOCAB)  # every patch, none dropped
    expected = float(megatron["vm_loss"])
    assert expected > 1e-3
    assert abs(kl - expected) <= 1e-5 * expected, (kl, expected)


def test_stand_in_tail_keeps_the_features_and_declares_no_head():
    """An export with no source tower behind it (a model trained from scratch) stands in
    identity layers after the feature layer and, having no pooling head, declares none."""
    from transformers import SiglipVisionModel

    from megatron_vwlmm.convert import layouts
    from megatron_vwlmm.convert.hf_configs import vision_hf_config
    from megatron_vwlmm.model.config import get_preset

    source = fx.siglip_vision_model()
    config = get_preset("tiny", vision="tiny-siglip")
    run, tail = layouts.split_vision_tail(layouts.vision_keys(source.state_dict()),
                                          config.vision.num_layers_run)
    assert {k.split(".")[0] for k in tail} == {"encoder", "post_layernorm", "head"}
    stand_in = layouts.identity_vision_tail(run, config.vision.num_layers_run,
                                            config.vision.num_layers)
    hf_config = vision_hf_config(config, with_head=False)
    assert hf_config.vision_use_head is False
    exported = SiglipVisionModel(hf_config).eval()
    exported.load_state_dict({**run, **stand_in}, strict=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = exported(images, output_hidden_states=True).hidden_states
        reference = source(images, output_hidden_states=True).hidden_states
    assert torch.equal(ours[config.vision.feature_layer], reference[config.vision.feature_layer])
    assert torch.equal(ours[-1], ours[-2])  # the stand-in layer is the identity


def test_processor_normalises_and_counts_tokens_the_siglip_way(siglip_run):
    from PIL import Image
    from transformers import AutoProcessor

    root, _ = siglip_run
    processor = AutoProcessor.from_pretrained(root / "llava_export")
    assert processor.num_additional_image_tokens == 0
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert list(processor.image_processor.image_std) == [0.5, 0.5, 0.5]
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "describe the image ."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.new("RGB", (32, 32), (255, 0, 128))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == fx.VOCAB).sum()) == 16  # one token per patch
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - 0.5) / 0.5
    assert torch.allclose(inputs["pixel_values"][0, :, 0, 0], expected, atol=1e-6)

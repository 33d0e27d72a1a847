"""LLaVA-1.5 checkpoints (LlavaLlamaForCausalLM, with and without a vm_head) import by their
weights and config fields at TP=2 x PP=2 and export to llava-hf: stock transformers gives the
source model's logits (fp32, rel 1e-5); the VM head is the source's or a copy of its LM head."""

from __future__ import annotations

import json

import pytest
import torch

from tests.megatron_vwlmm.convert import fixtures as fx
from tests.megatron_vwlmm.convert.conftest import LLAVA_VARIANTS


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", sorted(LLAVA_VARIANTS))
def test_llava_checkpoint_round_trip_logits(name, conversion_root, layout_outputs, reference_logits):
    from transformers import LlavaForConditionalGeneration

    b = fx.batch()
    ref = reference_logits["llama"]  # LLaVA-1.5's model: the LLM on CLIP features + projector
    megatron = layout_outputs[(name, 2, 2)]["logits"]
    export = conversion_root / f"{name}_export"
    stock = LlavaForConditionalGeneration.from_pretrained(export, attn_implementation="eager").eval()
    ids = b.tokens.clone()
    ids[b.image_token_mask] = fx.VOCAB
    with torch.no_grad():
        logits = stock(input_ids=ids, pixel_values=b.images,
                       attention_mask=torch.ones_like(ids)).logits[..., :fx.VOCAB]
    print(f"{name}: megatron TP2xPP2 rel {_rel(megatron, ref):.2e}, llava-hf rel {_rel(logits, ref):.2e}")
    assert _rel(megatron, ref) <= 1e-5 and _rel(logits, ref) <= 1e-5


def test_vm_head_is_the_sources_or_a_copy_of_the_lm_head(conversion_root):
    from safetensors.torch import load_file

    for name, kind in LLAVA_VARIANTS.items():
        source = load_file(str(conversion_root / name / "model.safetensors"))
        exported = load_file(str(conversion_root / f"{name}_export" / "model.safetensors"))
        has_vm_head = kind["vm_head_seed"] is not None
        want = source["vm_head.weight"] if has_vm_head else source["lm_head.weight"]
        assert torch.equal(exported["vm_head.weight"], want), name
        meta = json.loads((conversion_root / f"ck_{name}" / "vwlmm_config.json").read_text())
        record = meta["provenance"]["conversion"]
        assert record["vm_head_init"] == ("source" if has_vm_head else "lm_head")
        assert record["architecture"] == "llama" and meta["layout"] == {"tp": 2, "pp": 2}
        assert meta["provenance"]["tokenizer"] == str((conversion_root / name).resolve())
        assert meta["vwlmm_config"]["pif"] is False


def test_family_from_config_fields_and_pif_by_flag(tmp_path):
    from megatron_vwlmm.convert.errors import UnsupportedModelError
    from megatron_vwlmm.convert.hf_configs import original_decoder_family
    from megatron_vwlmm.convert.importer import _pif_of

    llava = {"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"]}
    assert original_decoder_family(llava, "c") == "llama"
    # VW-LMM's Mistral: LlavaConfig(MistralConfig), model_type "llava", whatever the class name
    assert original_decoder_family({**llava, "sliding_window": None}, "c") == "mistral"
    assert original_decoder_family({"model_type": "llava_mistral"}, "c") == "mistral"
    with pytest.raises(UnsupportedModelError, match="model_type 'llava_mpt'"):
        original_decoder_family({"model_type": "llava_mpt"}, "c")
    assert _pif_of(tmp_path / "vw-lmm-pif-7b", llava, None) is True  # VW-LMM's loader rule
    assert _pif_of(tmp_path / "vw-lmm-7b", llava, None) is False
    assert _pif_of(tmp_path / "vw-lmm-7b", {"architectures": ["vwPifLlamaForCausalLM"]}, None)
    assert _pif_of(tmp_path / "vw-lmm-pif-7b", llava, False) is False


def test_llava_checkpoint_without_tower_needs_one(conversion_root, tmp_path):
    import shutil

    from megatron_vwlmm.convert.errors import UnsupportedModelError
    from megatron_vwlmm.convert.importer import import_original

    shutil.copytree(conversion_root / "llava15", tmp_path / "llava")
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"  # a hub name, not a folder
    (tmp_path / "llava" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="no vision tower weights.*--vision"):
        import_original(str(tmp_path / "llava"), str(tmp_path / "out"))

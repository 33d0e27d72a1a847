"""megatron (TP2 x PP2, trainer-style checkpoint) -> llava-hf via the CLI: stock transformers
loads it, logits and the visual-word KL equal megatron's, and AutoProcessor + generate work."""

from __future__ import annotations

import json

import pytest

from tests.megatron_vwlmm.convert import fixtures as fx


@pytest.fixture(scope="module")
def megatron_tp2pp2(layout_outputs):
    return layout_outputs[("mistral", 2, 2)]


def test_stock_transformers_loads_with_only_vm_head_extra(llava_export):
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    _, info = LlavaForConditionalGeneration.from_pretrained(llava_export, output_loading_info=True)
    assert list(info["missing_keys"]) == []
    assert set(info["unexpected_keys"]) == {"vm_head.weight"}
    auto = AutoModelForImageTextToText.from_pretrained(llava_export)
    assert type(auto).__name__ == "LlavaForConditionalGeneration"
    config = json.loads((llava_export / "config.json").read_text())
    assert config["vision_feature_layer"] == -2 and config["image_token_index"] == fx.VOCAB
    assert config["text_config"]["rms_norm_eps"] == 1e-5
    assert config["text_config"]["vocab_size"] == fx.VOCAB + 1


def test_logits_and_visual_word_kl_match_megatron(llava_export, megatron_tp2pp2):
    logits, _, kl = fx.llava_export_outputs(llava_export, fx.batch())
    ours = megatron_tp2pp2["logits"]
    expected = float(megatron_tp2pp2["vm_loss"])
    print(f"llava-hf logits rel {float((logits - ours).norm() / ours.norm()):.2e}; "
          f"KL {kl:.8f} vs megatron vm_loss {expected:.8f}")
    assert float((logits - ours).norm() / ours.norm()) <= 1e-5
    assert expected > 1e-3
    assert abs(kl - expected) <= 1e-5 * expected, (kl, expected)


def test_generate_through_auto_processor(llava_export):
    from PIL import Image
    from transformers import AutoProcessor

    from megatron_vwlmm.convert.modeling_vwlmm import VWLMMForConditionalGeneration

    processor = AutoProcessor.from_pretrained(llava_export)
    assert processor.num_additional_image_tokens == 1
    assert processor.image_processor.do_pad
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "describe the image ."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("[INST] <image>\ndescribe")  # BOS comes from the tokenizer
    image = Image.new("RGB", (40, 24), (200, 30, 60))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert inputs["input_ids"][0, :2].tolist() == [processor.tokenizer.bos_token_id, 13]
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert int((inputs["input_ids"] == fx.VOCAB).sum()) == 16  # one token per patch
    model = VWLMMForConditionalGeneration.from_pretrained(llava_export).eval()
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 4 and fx.VOCAB not in new.tolist()
    assert isinstance(processor.decode(new), str)

"""The exported processor encodes the README's prompt for each template exactly as preprocessing
encoded the training sample up to its answer: BOS, the text pieces, the image's patch tokens.

The tokenizer is the real 32000-piece Mistral one (``vwlmm-preprocess build-tokenizer``), as
built (``legacy`` absent: the slow tokenizer's legacy default) and with ``"legacy": false``
(Vicuna-7B-v1.5's setting, which changes only the text after ``</s>``,
``preprocessing/legacy_tokenizer.py``); the training ids come from
``preprocessing.templates.tokenize`` with the encoder preprocessing picks for that folder; the
processor is saved and reloaded with stock ``AutoProcessor``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from preprocessing.templates import VICUNA_SYSTEM

VOCAB = 32000
NUM_PATCHES = 16  # the tiny preset's CLIP: 32 px images, 8 px patches
Q1, A1, Q2, A2 = "What is in the picture?", "A red square.", "And its colour?", "Red."
# The prompts README "Hugging Face conversion" documents, for one image and question Q1.
PROMPTS = {
    "plain": "<image>",
    "vicuna_v1": f"{VICUNA_SYSTEM} USER: <image>\n{Q1} ASSISTANT:",
    "mistral": f"[INST] <image>\n{Q1} [/INST]",
}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """legacy -> tokenizer folder."""
    import shutil

    from preprocessing.tokenizer import build_mistral_hf_tokenizer

    root = tmp_path_factory.mktemp("tok")
    legacy = build_mistral_hf_tokenizer(root / "mistral")
    assert "legacy" not in json.loads((legacy / "tokenizer_config.json").read_text())
    plain = shutil.copytree(legacy, root / "mistral-non-legacy")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    return {True: legacy, False: plain}


@pytest.fixture(scope="module")
def processors(tokenizer_dirs, tmp_path_factory):
    """(template, legacy) -> the exported processor, reloaded with stock ``AutoProcessor``."""
    from transformers import AutoProcessor

    from megatron_vwlmm.convert.processor import (CHAT_TEMPLATES, build_processor,
                                                  load_tokenizer_with_image_token)
    from megatron_vwlmm.model.config import get_preset

    out = {}
    for legacy, tokenizer_dir in tokenizer_dirs.items():
        for template in CHAT_TEMPLATES:
            tokenizer, image_id = load_tokenizer_with_image_token(tokenizer_dir, VOCAB)
            assert image_id == VOCAB
            folder = tmp_path_factory.mktemp(template)
            build_processor(tokenizer, get_preset("tiny"), template).save_pretrained(folder)
            out[template, legacy] = AutoProcessor.from_pretrained(folder)
    return out


def _training(template: str, turns, tokenizer_dir):
    from preprocessing.legacy_tokenizer import load_text_tokenizer
    from preprocessing.templates import Turn, tokenize

    tok = tokenize(template, [Turn(r, t) for r, t in turns], load_text_tokenizer(
        str(tokenizer_dir), "auto"))
    return tok.input_ids.tolist(), tok.labels.tolist()


def _prompt_ids(ids, labels, answer: int):
    """The ids before answer ``answer``'s first supervised token, each image expanded into its
    patch tokens as the model sees it."""
    supervised = np.flatnonzero(np.asarray(labels) != -100)
    starts = [int(i) for k, i in enumerate(supervised) if k == 0 or i != supervised[k - 1] + 1]
    prefix = []
    for tid in ids[:starts[answer]]:
        prefix += [VOCAB] * NUM_PATCHES if tid == -200 else [tid]
    return prefix


def _image():
    from PIL import Image

    return Image.new("RGB", (40, 24), (200, 30, 60))


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("template", list(PROMPTS))
def test_documented_prompt_reproduces_training_ids(template, legacy, processors, tokenizer_dirs):
    processor = processors[template, legacy]
    human = "<image>" if template == "plain" else f"<image>\n{Q1}"
    ids, labels = _training(template, [("human", human), ("gpt", A1)], tokenizer_dirs[legacy])
    want = _prompt_ids(ids, labels, 0)
    assert want[0] == processor.tokenizer.bos_token_id == 1
    got = processor(images=_image(), text=PROMPTS[template], return_tensors="pt")
    assert got["input_ids"][0].tolist() == want
    content = [{"type": "image"}] + ([] if template == "plain" else [{"type": "text", "text": Q1}])
    messages = [{"role": "user", "content": content}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == PROMPTS[template]
    tokenized = processor.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=True, return_dict=True, images=[_image()])
    assert list(tokenized["input_ids"][0]) == want  # one BOS, not two


@pytest.mark.parametrize("template", ["vicuna_v1", "mistral"])
def test_second_round_prompt_reproduces_training_ids(template, processors, tokenizer_dirs):
    """After an answer and its EOS, the next piece starts with its own dummy prefix, as in
    training with a legacy tokenizer folder (a ``"legacy": false`` one trains the piece after
    ``</s>`` without it, which no Hugging Face tokenizer setting reproduces together with the
    prefix after ``<image>``)."""
    processor = processors[template, True]
    turns = [("human", f"<image>\n{Q1}"), ("gpt", A1), ("human", Q2), ("gpt", A2)]
    ids, labels = _training(template, turns, tokenizer_dirs[True])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q1}]},
                {"role": "assistant", "content": A1},
                {"role": "user", "content": Q2}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    got = processor(images=_image(), text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    assert got == _prompt_ids(ids, labels, 1)

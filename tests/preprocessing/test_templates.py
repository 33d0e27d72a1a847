"""Templates and label masks on the real Mistral tokenizer; mismatch detection on stubs.
(Token-for-token equality with LLaVA's own code: test_llava_oracle.py; with an independent port:
test_llava_parity.py.)"""

from __future__ import annotations

import pytest

from tests.preprocessing.pp_checks import render_ids, supervised_runs
from vwlmm_data.contract import IGNORE_INDEX, IMAGE_TOKEN_ID
from preprocessing.legacy_tokenizer import load_text_tokenizer
from preprocessing.templates import VICUNA_SYSTEM, TemplateError, Turn, tokenize
from preprocessing.tokenizer import load_tokenizer

CONV = [Turn("human", "<image>\nWhat is shown?"), Turn("gpt", "A cat, asleep.  Really!"),
        Turn("human", "Colour?"), Turn("gpt", "Orange\nand white.")]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def sp(tokenizer_dir):
    """What the pipeline encodes with: the folder's SentencePiece model (LLaVA's slow path)."""
    return load_text_tokenizer(tokenizer_dir, "auto")


def _sample(t):
    return {"input_ids": t.input_ids, "labels": t.labels}


@pytest.mark.parametrize("template,text", [
    ("vicuna_v1", f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A cat, asleep.  "
                  "Really!</s>USER: Colour? ASSISTANT: Orange\nand white.</s>"),
    ("mistral", "<s>[INST] <image>\nWhat is shown? [/INST]A cat, asleep.  Really!</s>"
                "[INST] Colour? [/INST]Orange\nand white.</s>"),
])
def test_chat_templates_supervise_exactly_the_answers(tok, sp, template, text):
    t = tokenize(template, CONV, sp)
    assert render_ids(t.input_ids, tok) == text
    assert supervised_runs(_sample(t), tok) == ["A cat, asleep.  Really!</s>", "Orange\nand white.</s>"]
    assert t.num_images == 1 and t.labels[t.input_ids == IMAGE_TOKEN_ID] == IGNORE_INDEX
    assert t.input_ids[0] == tok.bos_token_id and t.labels[0] == IGNORE_INDEX


def test_lone_space_before_an_answer_is_supervised_as_in_llava(sp):
    """"ASSISTANT: 1. tree" tokenizes ':' '▁' '1' ...: LLaVA's "-2" leaves the '▁' a label."""
    t = tokenize("vicuna_v1", [Turn("human", "How many?"), Turn("gpt", "1. tree")], sp)
    supervised = t.input_ids[t.labels != IGNORE_INDEX].tolist()
    assert supervised == [28705, 28740, 28723, 4718, 2]
    assert t.input_ids[t.labels == IGNORE_INDEX][-1] == 28747  # ':' is the last prompt token


def test_plain_is_image_caption_newline(tok, sp):
    turns = [Turn("human", "<image>\nignored prompt"), Turn("gpt", " A red bus. ")]
    t = tokenize("plain", turns, sp)
    assert render_ids(t.input_ids, tok) == "<s><image> A red bus. \n"
    assert list(t.input_ids[:2]) == [tok.bos_token_id, IMAGE_TOKEN_ID]
    assert t.input_ids[-1] == 13 and tok.eos_token_id not in t.input_ids  # "\n", no EOS
    assert supervised_runs(_sample(t), tok) == [" A red bus. \n"]
    eos = tokenize("plain", turns, sp, plain_eos=True)
    assert render_ids(eos.input_ids, tok) == "<s><image> A red bus. </s>"
    assert supervised_runs(_sample(eos), tok) == [" A red bus. </s>"]
    with pytest.raises(TemplateError) as e:
        tokenize("plain", CONV, sp)
    assert e.value.reason == "template_incompatible"


@pytest.mark.parametrize("turns,reason", [
    ([Turn("gpt", "hi"), Turn("human", "x")], "bad_record"),
    ([Turn("human", "q")], "bad_record"),
    ([Turn("human", "q"), Turn("gpt", "  ")], "bad_record"),
    ([Turn("human", " "), Turn("gpt", "a")], "bad_record"),
    ([Turn("human", "q"), Turn("gpt", "see <image>")], "image_tag_mismatch"),
    ([Turn("human", "q"), Turn("gpt", "a</s>b")], "special_token_in_text"),
    ([Turn("human", "q"), Turn("gpt", "it said ASSISTANT: hi")], "tokenization_mismatch"),
])
def test_malformed_conversations(sp, turns, reason):
    with pytest.raises(TemplateError) as e:
        tokenize("vicuna_v1", turns, sp)
    assert e.value.reason == reason


def test_mistral_answer_merging_with_the_prompt_is_rejected(sp):
    # "[/INST]" + ". x" tokenizes "]." : no token boundary between prompt and answer
    with pytest.raises(TemplateError) as e:
        tokenize("mistral", [Turn("human", "q"), Turn("gpt", ". x")], sp)
    assert e.value.reason == "tokenization_mismatch" and "spans prompt and answer" in e.value.detail


class _CharTokenizer:
    """A tokenizer that merges ': ' with the next character, like a vocabulary with a ':_A'
    piece would: the boundary between prompt and answer falls inside a token."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True):
        ids, offsets, i = [], [], 0
        while i < len(text):
            n = 3 if text.startswith(": ", i) and i + 2 < len(text) else 1
            ids.append(1000 + i)
            offsets.append((i, i + n))
            i += n
        return {"input_ids": ids, "offset_mapping": offsets}

    def decode(self, ids, **kw):
        return "x" * len(ids)


def test_token_straddling_prompt_and_answer_is_rejected():
    with pytest.raises(TemplateError) as e:
        tokenize("vicuna_v1", [Turn("human", "q"), Turn("gpt", "A")], _CharTokenizer())
    assert e.value.reason == "tokenization_mismatch" and "spans prompt and answer" in e.value.detail


def test_answer_that_does_not_decode_back_is_rejected(tok):
    class Lossy:
        bos_token_id, eos_token_id = tok.bos_token_id, tok.eos_token_id

        def __call__(self, *a, **k):
            return tok(*a, **k)

        def decode(self, ids, **kw):  # e.g. a normalizer that rewrites characters
            return tok.decode(ids, **kw).replace("a", "\u0430")

    with pytest.raises(TemplateError) as e:
        tokenize("mistral", [Turn("human", "q"), Turn("gpt", "a cat")], Lossy())
    assert e.value.reason == "tokenization_mismatch" and "decodes to" in e.value.detail

"""Our shards against LLaVA-1.5's own data preparation (``llava_reference``, an independent
port): input_ids and labels token for token on generated conversations, pixels of every
fixture photo in both image modes."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from preprocessing.config import PreprocessConfig
from preprocessing.encode import Reject, encode
from preprocessing.images import ImageSettings, fit_image, process_image
from preprocessing.sources import llava
from preprocessing.tokenizer import load_tokenizer, mistral_sentencepiece_path
from tests.preprocessing import llava_reference as ref

QUESTIONS = ["What is shown?", "How many birds are there?", "Describe  the scene.",
             " Is it raining? ", "これは何ですか？", "Count the 🍎 apples.", "2 + 2 = ?",
             "Read the sign:\n'OPEN 24/7'", "Tab\tseparated?", "Where is the cat ", "why"]
ANSWERS = ["1. tree", "42", "3 cats and 2 dogs.", "The car is red.", " A leading space.",
           "Trailing spaces.  ", "  Two leading spaces", "这是一只猫。", "猫が寝ている。",
           "🙂 yes", "🧑\u200d🌾 a farmer", "Yes,  double  spaces.", "Line one\nLine two",
           "\tTabbed", "(parenthesised) start", ". starts with a dot", ", comma start",
           "é accented", "2024年", "'quoted'", "50%", "-1 degrees", "#1 rank", "A",
           "code:\n    indented()", "…ellipsis", "ok.\n", "Ünïcödé ñ"]
RARE = {"empty": ["", "   ", "\n"], "separator": ["It printed ASSISTANT: done", "a [/INST] b"],
        "special": ["x </s> y", "<s> tag"]}
PER_TEMPLATE = 300


def _question(rng: random.Random, with_image: bool) -> str:
    q = rng.choice(QUESTIONS)
    if not with_image:
        return q
    where = rng.choice(["start", "middle", "end"])
    if where == "start":
        return "<image>\n" + q
    if where == "end":
        return q + "\n<image>"
    cut = rng.randrange(len(q) + 1)
    return q[:cut] + "<image>" + q[cut:]


def _answer(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.04:
        return rng.choice(RARE["empty"])
    if roll < 0.06:
        return rng.choice(RARE["separator"])
    if roll < 0.075:
        return rng.choice(RARE["special"])
    return rng.choice(ANSWERS)


def generate(template: str, n: int, seed: int) -> list[dict]:
    """LLaVA-JSON records: image tag at the start / middle / end of the first turn, or none
    (text-only); one to three rounds; numbers, CJK, emoji, stray spaces, empty answers."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        with_image = template == "plain" or rng.random() < 0.8
        rounds = 1 if template == "plain" else rng.choice([1, 1, 2, 3])
        conv = []
        for k in range(rounds):
            conv.append({"from": "human", "value": _question(rng, with_image and k == 0)})
            conv.append({"from": "gpt", "value": _answer(rng)})
        entry = {"id": f"{template}-{i}", "conversations": conv}
        if with_image:
            entry["image"] = "img.jpg"
        out.append(entry)
    return out


@pytest.fixture(scope="module")
def oracle():
    return ref.SlowLegacyTokenizer(mistral_sentencepiece_path())


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    Image.new("RGB", (40, 30), (10, 200, 30)).save(root / "img.jpg")
    return root


def _ours(entries, template, tokenizer_dir, image_root, tmp_path):
    """Each record through the workers' path: unit file -> llava.read_unit -> encode."""
    unit = tmp_path / f"{template}.jsonl"
    unit.write_text("".join(json.dumps(e) + "\n" for e in entries))
    cfg = PreprocessConfig(source="llava", inputs=["gen.json"], image_root=str(image_root),
                           tokenizer=tokenizer_dir, output=str(tmp_path / "o"), template=template,
                           image_size=28, patch_size=14, max_seq_len=4096)
    assert cfg.tokenizer_backend == "sentencepiece"
    tok = load_tokenizer(tokenizer_dir)
    for rec in llava.read_unit(str(unit), 0, str(image_root), "gen.json"):
        try:
            yield encode(rec, cfg, tok)
        except Reject as exc:
            yield exc


def _expected_reject(entry, template, oracle) -> str | None:
    texts = [t["value"] for t in entry["conversations"]]
    if any(s in t for t in texts for s in oracle.specials):
        return "special_token_in_text"  # LLaVA: a special id in the text ("</s>" also masks all)
    if any(not t.strip() for t in texts):
        return "bad_record"  # LLaVA would train on an empty answer
    if template == "plain":
        return None
    _, _, mismatch = ref.llava_sample(entry, template, oracle)
    has_image = "image" in entry
    turns = [(t["from"], t["value"]) for t in entry["conversations"]]
    turns = ref.preprocess_multimodal(turns) if has_image else turns
    if mismatch or ref.boundary_merged(turns, oracle, has_image, template):
        return "tokenization_mismatch"  # LLaVA: sample masked whole, or labels off by a token
    return None


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "mistral"])
def test_tokens_and_labels_equal_llava(template, oracle, tokenizer_dir, image_root, tmp_path):
    entries = generate(template, PER_TEMPLATE, seed=["plain", "vicuna_v1", "mistral"].index(template))
    compared, rejected, lone_space_labels = 0, {}, 0
    for entry, got in zip(entries, _ours(entries, template, tokenizer_dir, image_root, tmp_path)):
        want_reject = _expected_reject(entry, template, oracle)
        if isinstance(got, Reject) or want_reject:
            assert isinstance(got, Reject) and got.reason == want_reject, (entry, got)
            rejected[got.reason] = rejected.get(got.reason, 0) + 1
            continue
        ids, labels, _ = ref.llava_sample(entry, template, oracle)
        assert got.input_ids.tolist() == ids, entry
        assert got.labels.tolist() == labels, entry
        compared += 1
        # the lone "▁" before an answer starting with a digit / CJK / emoji is a label
        lone_space_labels += sum(1 for a, b in zip(labels, labels[1:]) if a == 28705 and b != -100)
    print(f"{template}: {compared} samples identical to LLaVA's, rejected {rejected}, "
          f"{lone_space_labels} supervised lone '▁' tokens")
    assert compared >= 200 and lone_space_labels >= 20
    assert rejected.get("bad_record", 0) >= 3 and rejected.get("special_token_in_text", 0) >= 1
    if template != "plain":
        assert rejected.get("tokenization_mismatch", 0) >= 2


def test_generator_covers_the_cases():
    entries = [e for t in ("plain", "vicuna_v1", "mistral") for e in generate(t, PER_TEMPLATE, 1)]
    first = [e["conversations"][0]["value"] for e in entries if "image" in e]
    assert any(q.startswith("<image>") for q in first) and any(q.endswith("<image>") for q in first)
    assert any(0 < q.find("<image>") < len(q) - len("<image>") for q in first)  # the middle
    assert sum("image" not in e for e in entries) > 50
    assert sum(len(e["conversations"]) > 2 for e in entries) > 100


# -- pixels -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos():
    from preprocessing.fixtures import _PHOTOS, _encode, _photo

    # every fixture photo at its own size (up to 1411 px): real downscaling to 336 px
    return {name: _encode(_photo(name, 4096)) for name, _ in _PHOTOS}


@pytest.mark.parametrize("mode,llava_mode", [("pad", "pad"), ("crop", "square")])
def test_pixels_equal_llava_before_storage_and_within_jpeg_error_after(photos, mode, llava_mode):
    from pipeline.data.decode import decode_image
    from vwlmm_data.contract import VisionInfo

    processor = ref.clip_processor(336)
    mean = np.asarray(processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(processor.image_std, np.float32)[:, None, None]
    settings = ImageSettings(size=336, mode=mode)
    worst_mean, worst_max = 0.0, 0.0
    for name, data in photos.items():
        want = ref.llava_pixels(data, llava_mode, processor)  # [3, 336, 336], normalised
        array = np.asarray(fit_image(Image.open(io.BytesIO(data)), settings), np.float32)
        ours = (array.transpose(2, 0, 1) / 255.0 - mean) / std
        # the array we encode is LLaVA's, bit for bit (float32 rounding only)
        assert np.abs((ours - want) * std).max() * 255 < 1e-3, name
        stored = decode_image(process_image(data, settings), 336, name,
                              VisionInfo.of("clip")).numpy()
        err = np.abs((stored - want) * std) * 255  # in 8-bit pixel levels
        worst_mean, worst_max = max(worst_mean, err.mean()), max(worst_max, err.max())
    print(f"{mode}: stored JPEG vs LLaVA: worst mean {worst_mean:.2f}/255, max {worst_max:.0f}/255")
    assert worst_mean <= 2.0  # JPEG q95 4:4:4; measured 1.56 (pad) / 1.69 (crop)

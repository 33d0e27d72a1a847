"""Our samples against LLaVA-1.5's own code (``llava_oracle``: haotian-liu/LLaVA's functions
under LLaVA's tokenizer pins, slow ``LlamaTokenizer``), for ``legacy: true`` and ``legacy: false``
tokenizer folders: input_ids and labels token for token on generated conversations, and the
records LLaVA trains on only after an adjustment. The mistral template's ids are checked against
VW-LMM's own ``conversation.py`` when ``VWLMM_CONVERSATION`` names it (its labels against the rule
``llava_oracle`` states: VW-LMM published no training code)."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from PIL import Image

from preprocessing.config import PreprocessConfig
from preprocessing.encode import Reject, encode
from preprocessing.sources import llava
from preprocessing.task_results import UnitStats
from preprocessing.tokenizer import load_tokenizer, tokenizer_identity
from tests.preprocessing import llava_oracle
from tests.preprocessing.test_llava_parity import ANSWERS, QUESTIONS

SPECIALS = ("<s>", "</s>", "<unk>")
PER_CASE = 150
VWLMM = os.environ.get("VWLMM_CONVERSATION")
TEMPLATES = ["plain", "vicuna_v1"] + (["mistral"] if VWLMM else [])


def _question(rng: random.Random, tags: int) -> str:
    q = rng.choice(QUESTIONS)
    cuts = sorted({"start": 0, "end": len(q)}.get(where, rng.randrange(len(q) + 1))
                  for where in rng.choices(["start", "middle", "end"], k=tags))
    pieces = [q[a:b] for a, b in zip([0] + cuts, cuts + [len(q)])]
    out = pieces[0]
    for piece in pieces[1:]:
        out += rng.choice(["<image>", "<image>\n", "\n<image>"]) + piece
    return out


def generate(template: str, n: int, seed: int) -> list[dict]:
    """LLaVA-JSON records: 1-4 rounds (plain: 1); the image tag at the start, middle or end of
    the first turn, sometimes twice; text-only records, some with ``<image>`` as text; some
    conversations opened by a gpt turn; digits, CJK, emoji, stray spaces and newlines."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        with_image = template == "plain" or rng.random() < 0.7
        rounds = 1 if template == "plain" else rng.randint(1, 4)
        tags = (2 if rng.random() < 0.15 else 1) if with_image else int(rng.random() < 0.2)
        conv = []
        if template != "plain" and rng.random() < 0.1:  # preprocess_plain asserts on these
            conv.append({"from": "gpt", "value": rng.choice(ANSWERS)})
        for k in range(rounds):
            conv.append({"from": "human", "value": _question(rng, tags if k == 0 else 0)})
            conv.append({"from": "gpt", "value": rng.choice(ANSWERS + ["x </s> y", ""])})
        entry = {"id": f"{template}-{i}", "conversations": conv}
        if with_image:
            entry["image"] = "img.jpg"
        out.append(entry)
    return out


@pytest.fixture(scope="module")
def folders(tokenizer_dir, tmp_path_factory):
    """legacy -> tokenizer folder: the converted Mistral folder (no ``legacy`` key: the slow
    tokenizer's default, True) and a copy whose tokenizer_config.json says ``legacy: false``."""
    copy = tmp_path_factory.mktemp("tok") / "legacy-false"
    shutil.copytree(tokenizer_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    assert "legacy" not in config
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    return {True: tokenizer_dir, False: str(copy)}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    Image.new("RGB", (40, 30), (10, 200, 30)).save(root / "img.jpg")
    return root


CASES = [(t, legacy) for t in TEMPLATES for legacy in (True, False)]
NO_VWLMM = pytest.mark.skipif(not VWLMM, reason="VWLMM_CONVERSATION does not name "
                              "visual_words/conversation.py of a pengts/VW-LMM checkout "
                              "(VW-LMM ships no package)")


ADJUSTED = [
    {"id": "tags", "image": "img.jpg", "conversations": [
        {"from": "human", "value": "<image>\nCompare <image> with itself."},
        {"from": "gpt", "value": "Same."}]},
    {"id": "text", "conversations": [
        {"from": "human", "value": "What does <image> mean in HTML?"},
        {"from": "gpt", "value": "The <image> tag is not HTML; <img> is."}]},
    {"id": "gpt-first", "image": "img.jpg", "conversations": [
        {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "<image>\nWhat?"},
        {"from": "gpt", "value": "A bird."}, {"from": "human", "value": "Colour?"},
        {"from": "gpt", "value": "Blue."}]},
]


@pytest.fixture(scope="module")
def llava_outputs(folders):
    """(template, legacy) -> (entries, LLaVA's result for each), one oracle subprocess;
    ("adjusted", legacy): the ``ADJUSTED`` records with vicuna_v1."""
    entries = {case: generate(case[0], PER_CASE, seed=i) for i, case in enumerate(CASES)}
    entries.update({("adjusted", legacy): ADJUSTED for legacy in (True, False)})
    jobs = [{"tokenizer": folders[legacy],
             "template": "vicuna_v1" if template == "adjusted" else template, "entry": e}
            for (template, legacy), es in entries.items() for e in es]
    results = iter(llava_oracle.run(jobs))
    return {case: (es, [next(results) for _ in es]) for case, es in entries.items()}


def _ours(entries, template, tokenizer_dir, image_root, tmp_path, strict=False):
    """Each record through the workers' path: unit file -> llava.read_unit -> encode."""
    unit = tmp_path / f"{template}.jsonl"
    unit.write_text("".join(json.dumps(e) + "\n" for e in entries))
    cfg = PreprocessConfig(source="llava", inputs=["gen.json"], image_root=str(image_root),
                           tokenizer=tokenizer_dir, output=str(tmp_path / "o"), template=template,
                           image_size=28, patch_size=14, max_seq_len=8192,
                           source_options={"strict_records": strict})
    tok = load_tokenizer(tokenizer_dir)
    for rec in llava.read_unit(str(unit), 0, str(image_root), "gen.json", strict=strict):
        try:
            yield encode(rec, cfg, tok)
        except Reject as exc:
            yield exc


def _expected_reject(entry: dict, want: dict) -> set[str]:
    """The reasons we may give where LLaVA fails, masks the sample whole, or silently counts a
    token spanning prompt and answer; empty where we must emit LLaVA's sample."""
    texts = [t["value"] for t in entry["conversations"]]
    if any(s in t for t in texts for s in SPECIALS):
        return {"special_token_in_text"}
    if any(not t.strip() for t in texts):
        return {"bad_record"}  # LLaVA: a whole-sample mask or an empty answer
    if "error" in want or want["mismatch"] or want["boundary"] or \
            all(x == -100 for x in want["labels"]):
        return {"tokenization_mismatch", "image_tag_mismatch", "bad_record"}
    return set()


@pytest.mark.parametrize("template,legacy", [
    *[(t, legacy) for t in ("plain", "vicuna_v1") for legacy in (True, False)],
    *[pytest.param("mistral", legacy, marks=NO_VWLMM) for legacy in (True, False)]])
def test_tokens_and_labels_equal_llavas_code(template, legacy, llava_outputs, folders,
                                             image_root, tmp_path):
    entries, wants = llava_outputs[(template, legacy)]
    compared, rejected, adjusted = 0, {}, {}
    ours = _ours(entries, template, folders[legacy], image_root, tmp_path)
    for entry, want, got in zip(entries, wants, ours):
        allowed = _expected_reject(entry, want)
        if isinstance(got, Reject) or allowed:
            assert isinstance(got, Reject) and got.reason in allowed, (entry, want, got)
            rejected[got.reason] = rejected.get(got.reason, 0) + 1
            continue
        assert got.input_ids.tolist() == want["input_ids"], (entry, want.get("prompt"))
        assert got.labels.tolist() == want["labels"], (entry, want.get("prompt"))
        compared += 1
        for name in json.loads(got.meta).get("adjusted", ()):
            adjusted[name] = adjusted.get(name, 0) + 1
    print(f"{template} legacy={legacy}: {compared} samples identical to LLaVA's, "
          f"rejected {rejected}, adjusted {adjusted}")
    assert compared >= 80
    multi_round = sum(len(e["conversations"]) > 3 for e in entries)
    assert template == "plain" or multi_round >= 60
    want_adjusted = {"image_tags_collapsed"} | (set() if template == "plain" else
                                                {"image_tag_as_text", "leading_gpt_turn_dropped"})
    assert set(adjusted) == want_adjusted and min(adjusted.values()) >= 3


def test_the_three_adjustments_as_llava_trains_them_or_rejected_when_strict(
        llava_outputs, folders, image_root, tmp_path):
    for legacy in (True, False):
        entries, wants = llava_outputs[("adjusted", legacy)]
        got = list(_ours(entries, "vicuna_v1", folders[legacy], image_root, tmp_path))
        stats = UnitStats()
        for entry, want, sample in zip(entries, wants, got):
            assert not isinstance(sample, Reject), (entry, sample)
            assert sample.input_ids.tolist() == want["input_ids"], entry
            assert sample.labels.tolist() == want["labels"], entry
            assert any(x != -100 for x in want["labels"]) and not want["mismatch"]
            stats.add(sample)
        assert stats.adjusted == dict.fromkeys(llava.ADJUSTMENTS, 1)
        assert [s.num_images for s in got] == [1, 0, 1]
    strict = list(_ours(ADJUSTED, "vicuna_v1", folders[True], image_root, tmp_path, strict=True))
    assert [r.reason for r in strict] == ["image_tag_mismatch", "image_tag_mismatch", "bad_record"]


def test_tag_in_two_turns_for_one_image_stays_rejected(folders, image_root, tmp_path):
    """LLaVA would put an image placeholder in front of each turn: two for one image."""
    entry = {"id": "two", "image": "img.jpg", "conversations": [
        {"from": "human", "value": "<image> A?"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "<image> B?"}, {"from": "gpt", "value": "b"}]}
    (got,) = _ours([entry], "vicuna_v1", folders[True], image_root, tmp_path)
    assert isinstance(got, Reject) and got.reason == "image_tag_mismatch"


def test_manifest_records_the_effective_tokenizer_flags(folders):
    for legacy in (True, False):
        info = tokenizer_identity(folders[legacy], "sentencepiece")
        assert info.encoding == {"backend": "sentencepiece", "legacy": legacy,
                                 "add_bos_token": True, "add_eos_token": False,
                                 "add_prefix_space": None}
        assert type(info).from_dict(info.to_dict()).encoding == info.encoding
    assert tokenizer_identity(folders[False], "fast").encoding == {"backend": "fast"}


def test_tokenizer_folders_llava_cannot_count_are_refused(folders, tmp_path):
    bad = tmp_path / "no-bos"
    shutil.copytree(folders[True], bad)
    config = json.loads((bad / "tokenizer_config.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    with pytest.raises(ValueError, match="add_bos_token"):
        tokenizer_identity(str(bad), "sentencepiece")


@pytest.mark.parametrize("strict", [False, True])
def test_manifest_counts_adjusted_records_and_names_the_flags(strict, folders, image_root,
                                                             tmp_path, monkeypatch):
    from tests.preprocessing.inline_job import llava_config, run_inline

    data = tmp_path / "in.json"
    data.write_text(json.dumps(ADJUSTED))
    cfg = llava_config(data, image_root, folders[False], tmp_path / "out", template="vicuna_v1",
                       max_seq_len=4096, source_options={"strict_records": strict})
    manifest = run_inline(monkeypatch, cfg).manifest
    assert manifest.tokenizer.encoding["legacy"] is False
    if strict:
        assert manifest.num_samples == 0 and manifest.statistics.adjusted == {}
        assert manifest.rejected == {"bad_record": 1, "image_tag_mismatch": 2}
    else:
        assert manifest.num_samples == 3 and manifest.rejected == {}
        assert manifest.statistics.adjusted == dict.fromkeys(sorted(llava.ADJUSTMENTS), 1)

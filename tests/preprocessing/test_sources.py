"""Source readers without Ray: tar byte ranges, parquet join, keys, LLaVA tag placement."""

from __future__ import annotations

import json

import pytest

from preprocessing.sources import laion, llava, make_key


def test_tar_ranges_cover_every_sample_exactly_once(demo):
    tar, parquet = demo.laion_tars[0], demo.laion_parquets[0]
    scanned = laion.scan(str(tar))
    assert len({r["key"] for r in scanned}) == len(scanned)
    # Split at arbitrary record boundaries: the ranges re-read exactly the scanned samples.
    keys = []
    for a, b in ((0, 5), (5, 6), (6, len(scanned))):
        recs = list(laion.read_unit(str(tar), str(parquet), scanned[a]["start"], scanned[b - 1]["end"]))
        keys += [r.key for r in recs]
    assert keys == [r["key"] for r in scanned]
    rec = next(r for r in laion.read_unit(str(tar), str(parquet), scanned[0]["start"], scanned[0]["end"]))
    assert rec.meta["similarity"] == pytest.approx(0.33) and rec.meta["url"].startswith("https://")
    assert rec.turns[1].text == rec.meta["caption"] and rec.images and rec.error is None


def test_broken_tar_names_the_file(tmp_path, demo):
    data = demo.laion_tars[0].read_bytes()
    bad = tmp_path / "00007.tar"
    bad.write_bytes(data[:1024] + b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="00007.tar: unreadable tar"):
        laion.scan(str(bad))


def test_pairing_requires_a_tar_per_parquet():
    assert laion.pair_inputs(["a/0.tar", "a/0.parquet", "a/1.tar"]) == [("a/0.tar", "a/0.parquet"), ("a/1.tar", None)]
    with pytest.raises(ValueError, match="without a matching"):
        laion.pair_inputs(["a/0.tar", "a/9.parquet"])


def test_keys_are_webdataset_safe_and_distinct():
    assert make_key("llava", "000123") == "llava-000123"
    a, b = make_key("llava", "sa.1/x"), make_key("llava", "sa_1_x")
    assert a != b and "." not in a and "/" not in a


def test_llava_moves_a_single_image_tag_to_the_front(tmp_path):
    (tmp_path / "i.jpg").write_bytes(b"x")
    entry = {"id": "1", "image": "i.jpg", "conversations": [
        {"from": "human", "value": "Look: <image> what is it?"}, {"from": "gpt", "value": "A."}]}
    (tmp_path / "r.jsonl").write_text(json.dumps(entry) + "\n")
    (rec,) = llava.read_unit(str(tmp_path / "r.jsonl"), 0, str(tmp_path), "x.json")
    assert rec.turns[0].text == "<image>\nLook:  what is it?" and rec.meta["image_tag_moved"]
    assert rec.images == [b"x"]


def test_llava_image_tag_handling_follows_preprocess_multimodal(tmp_path):
    """Only the turn holding the tag is rewritten (LLaVA strips it); a missing tag is added."""
    (tmp_path / "i.jpg").write_bytes(b"x")
    conv = [{"from": "human", "value": " Hi  "}, {"from": "gpt", "value": " A. "},
            {"from": "human", "value": "And this <image>? "}, {"from": "gpt", "value": "B"}]
    no_tag = [{"from": "human", "value": "Hi "}, {"from": "gpt", "value": "A"}]
    lines = [{"id": "1", "image": "i.jpg", "conversations": conv},
             {"id": "2", "image": "i.jpg", "conversations": no_tag}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    later, added = llava.read_unit(str(tmp_path / "r.jsonl"), 0, str(tmp_path), "x.json")
    assert [t.text for t in later.turns] == [" Hi  ", " A. ", "<image>\nAnd this ?", "B"]
    assert [t.text for t in added.turns] == ["<image>\nHi", "A"]
    assert added.meta["image_tag_added"] and "image_tag_moved" not in added.meta


@pytest.mark.parametrize("chunk_bytes", [1, 3, 64, 1 << 22])
def test_streaming_json_array_matches_json_load(chunk_bytes):
    import io

    data = [{"id": i, "text": "naïve 東京 " * (i % 7), "n": 10 ** 15 + i} for i in range(200)]
    data += [123456789, "s", None, [1, 2]]  # non-object entries become bad_record later
    raw = json.dumps(data, indent=1).encode()
    assert list(llava.iter_json_array(io.BytesIO(raw), "x.json", chunk_bytes)) == data
    for bad, msg in ((b'{"a": 1}', "expected a JSON array"), (b"[1, 2", "not closed"),
                     (b'[{"a": 1}, {"b"', "not valid JSON")):
        with pytest.raises(ValueError, match=msg):
            list(llava.iter_json_array(io.BytesIO(bad), "x.json", chunk_bytes))

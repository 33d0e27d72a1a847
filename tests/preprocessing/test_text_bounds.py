"""LLaVA text is bounded like images: a record whose conversation has more than
``--max-text-bytes`` of text is the counted reject ``text_too_large``, decided at the scan, and
its text never reaches a unit file, a worker or the tokenizer."""

from __future__ import annotations

import json

from preprocessing.cli import config_from_args
from preprocessing.sources.llava import DEFAULT_MAX_TEXT_BYTES, read_unit, split


def _record(sid: str, answer: str) -> dict:
    return {"id": sid, "conversations": [{"from": "human", "value": "What is this?"},
                                         {"from": "gpt", "value": answer}]}


def test_an_over_long_conversation_is_a_reject_and_its_text_is_dropped(tmp_path):
    big = "blah " * (DEFAULT_MAX_TEXT_BYTES // 5 + 10)  # just over the default bound
    src = tmp_path / "data.json"
    src.write_text(json.dumps([_record("small", "A cat."), _record("huge", big),
                               _record("also-small", "A dog.")]))
    keys = split(str(src), str(tmp_path / "units"), 10)
    unit = tmp_path / "units-000000.jsonl"
    assert unit.stat().st_size < 2000  # the big text is not copied into the unit file
    recs = list(read_unit(str(unit), 0, str(tmp_path), "data.json"))
    assert [r.key for r in recs] == keys
    assert [r.error[0] if r.error else "ok" for r in recs] == ["ok", "text_too_large", "ok"]
    assert recs[1].source_id == "huge" and "bytes of text" in recs[1].error[1]
    assert recs[1].turns == []


def test_max_text_bytes_is_an_option_of_the_llava_source(tmp_path):
    args = ["--source", "llava", "--input", "x.json", "--image-root", str(tmp_path),
            "--tokenizer", "tok", "--template", "plain", "--output", str(tmp_path / "out")]
    cfg = config_from_args(args + ["--max-text-bytes", "100"])
    assert cfg.source_options.max_text_bytes == 100
    assert config_from_args(args).source_options.max_text_bytes == DEFAULT_MAX_TEXT_BYTES
    src = tmp_path / "data.json"
    src.write_text(json.dumps([_record("a", "x" * 200)]))
    split(str(src), str(tmp_path / "units"), 10, max_text_bytes=100)
    rec, = read_unit(str(tmp_path / "units-000000.jsonl"), 0, str(tmp_path), "data.json")
    assert rec.error[0] == "text_too_large"

"""The source seam: the CLI's choices come from the registry, and a third source plugs in without
touching the driver, the worker, the encoder or the config (the whole driver runs in-process)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from preprocessing import sources
from preprocessing.cli import build_parser
from preprocessing.config import PreprocessConfig
from preprocessing.sources import RawRecord, Scan, content_digest, make_key
from preprocessing.templates import IMAGE_TAG, Turn
from preprocessing.tokenizer import load_tokenizer
from tests.preprocessing.inline_job import jpeg, run_inline
from tests.preprocessing.pp_checks import read_webdataset
from vwlmm_data import storage
from vwlmm_data.contract import IMAGE_TOKEN_ID


def test_cli_source_choices_and_help_come_from_the_registry():
    action = next(a for a in build_parser()._actions if a.dest == "source")
    assert tuple(action.choices) == sources.source_choices() == ("laion", "llava", "sharegpt4v")
    for s in sources.SOURCES.values():
        assert s.help in action.help
    assert sources.get_source("sharegpt4v") is sources.get_source("llava")
    with pytest.raises(ValueError, match="unknown source 'coco'"):
        sources.get_source("coco")


class CaptionLines:
    """A toy third source: JSON lines ``{"id", "image", "caption"}``, images under --image-root;
    units are line ranges, digests need the images, captions saying SPAM are rejected."""

    name = "captions"
    aliases = ("caps",)
    help = "JSON lines of id, image, caption"
    needs_image_root = True

    def input_files(self, files):
        return [(f, {}) for f in files]

    def _lines(self, uri, cfg):
        return storage.read_bytes(uri, cfg.s3).decode().splitlines()

    def scan(self, uri, cfg, scratch):
        lines = self._lines(uri, cfg)
        sps = cfg.samples_per_shard
        return Scan(keys=[make_key(self.name, json.loads(l)["id"]) for l in lines], digests=None,
                    units=[{"first": c, "num_records": min(sps, len(lines) - c)}
                           for c in range(0, len(lines), sps)])

    def read_unit(self, unit, cfg):
        for line in self._lines(unit["file"], cfg)[unit["first"]:][:unit["num_records"]]:
            entry = json.loads(line)
            image = storage.read_bytes(storage.join(cfg.image_root, entry["image"]), cfg.s3)
            yield RawRecord(make_key(self.name, entry["id"]), entry["id"],
                            turns=[Turn("human", IMAGE_TAG), Turn("gpt", entry["caption"])],
                            images=[image], meta={"caption": entry["caption"]})

    def digests(self, unit, cfg):
        return [content_digest(r.images, r.turns[1].text) for r in self.read_unit(unit, cfg)]

    def reject(self, rec, cfg):
        return ("spam", "caption says SPAM") if "SPAM" in rec.turns[1].text else None


def test_a_third_source_runs_through_the_unchanged_driver(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    monkeypatch.setattr(sources, "_ALIASES", dict(sources._ALIASES))
    sources.register(CaptionLines())
    images = tmp_path / "img"
    images.mkdir()
    for name, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (images / f"{name}.jpg").write_bytes(jpeg(colour))
    entries = [("a", "red", "A red square."), ("b", "blue", "A blue square."),
               ("c", "red", "A red square."),  # the same image and text as "a"
               ("d", "blue", "Buy SPAM now."), ("a", "blue", "Another a.")]  # "a" again: renamed
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"id": i, "image": f"{img}.jpg", "caption": c}) + "\n" for i, img, c in entries))
    cfg = PreprocessConfig(source="caps", inputs=[str(tmp_path / "in.jsonl")],
                           image_root=str(images), tokenizer=tokenizer_dir,
                           output=str(tmp_path / "out"), image_size=28, patch_size=14,
                           samples_per_shard=2, max_seq_len=64, progress=False)
    assert cfg.source == "captions" and cfg.image_mode == "crop"
    with pytest.raises(ValueError, match="--source captions needs --image-root"):
        PreprocessConfig(source="captions", inputs=["x"], tokenizer=tokenizer_dir, output="o")

    manifest = run_inline(monkeypatch, cfg).manifest
    assert (manifest.num_samples, manifest.rejected) == (3, {"duplicate": 1, "spam": 1})
    # units of records (a, b), (c, d), (a): the second is all rejected and leaves no shard
    assert [s.path for s in manifest.shards] == ["shard-000000.tar", "shard-000002.tar"]
    rejects = [json.loads(l) for l in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert {(r["key"], r["reason"]) for r in rejects} == {("captions-c", "duplicate"),
                                                           ("captions-d", "spam")}
    samples = read_webdataset([str(tmp_path / "out" / s.path) for s in manifest.shards])
    assert [s["key"] for s in samples] == ["captions-a", "captions-b", "captions-a_1"]
    tok = load_tokenizer(tokenizer_dir)
    first = samples[0]
    text = tok.decode([t for t in first["input_ids"] if t >= 0], skip_special_tokens=True)
    assert text.strip() == "A red square." and first["num_images"] == 1
    assert np.count_nonzero(first["input_ids"] == IMAGE_TOKEN_ID) == 1

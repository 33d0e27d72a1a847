"""A toy third source, written as a module of ``preprocessing/sources/`` would be: JSON lines
``{"id", "image", "caption"}``, images under --image-root; units are line ranges, digests need
the images, and its own option ``--banned-word`` rejects captions holding that word.

tests/preprocessing/test_source_registry.py registers it in-process, and also copies this file
into a copy of the ``preprocessing`` package to run it through the installed command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from preprocessing.sources.base import JobSettings, RawRecord, Scan, content_digest, make_key
from preprocessing.sources.options import option
from preprocessing.templates import IMAGE_TAG, Turn
from vwlmm_data import storage


@dataclass(frozen=True)
class CaptionOptions:
    banned_word: str | None = option(None, "reject captions holding this word")


class CaptionLines:
    name = "captions"
    aliases = ("caps",)
    help = "JSON lines of id, image, caption"
    needs_image_root = True
    options = CaptionOptions

    def input_files(self, files):
        return [(f, {}) for f in files]

    def _lines(self, uri, cfg: JobSettings):
        return storage.read_bytes(uri, cfg.s3).decode().splitlines()

    def scan(self, uri, cfg: JobSettings, scratch):
        lines = self._lines(uri, cfg)
        sps = cfg.samples_per_shard
        return Scan(keys=[make_key(self.name, json.loads(l)["id"]) for l in lines], digests=None,
                    units=[{"first": c, "num_records": min(sps, len(lines) - c)}
                           for c in range(0, len(lines), sps)])

    def read_unit(self, unit, cfg: JobSettings):
        for line in self._lines(unit["file"], cfg)[unit["first"]:][:unit["num_records"]]:
            entry = json.loads(line)
            image = storage.read_bytes(storage.join(cfg.image_root, entry["image"]), cfg.s3)
            yield RawRecord(make_key(self.name, entry["id"]), entry["id"],
                            turns=[Turn("human", IMAGE_TAG), Turn("gpt", entry["caption"])],
                            images=[image], meta={"caption": entry["caption"]})

    def digests(self, unit, cfg: JobSettings):
        return [content_digest(r.images, r.turns[1].text) for r in self.read_unit(unit, cfg)]

    def reject(self, rec, cfg: JobSettings):
        word = cfg.source_options.banned_word
        if word and word in rec.turns[1].text:
            return "banned_word", f"caption holds {word!r}"
        return None

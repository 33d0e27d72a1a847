"""LLaVA / ShareGPT4V conversation JSON: ``[{id, image?, conversations: [{from, value}]}]``.

``image`` is a path relative to ``--image-root`` (or a list of them); entries without it are
text-only. As LLaVA's ``preprocess_multimodal`` does, a single image's ``<image>`` tag is moved
to the front of the human turn holding it: that turn becomes ``<image>\\n`` + its text without
the tag, stripped; every other turn is kept as written. The record's meta says
``image_tag_moved`` when that changed the text. A single image without a tag gets one in front
of the first human turn (``image_tag_added``; LLaVA would train on the text and ignore the
image). With several images the tags stay where they are and their count must match.

Records LLaVA trains on after an adjustment are adjusted the same way, each named in the
record's meta ``adjusted`` list and counted in the manifest's ``statistics.adjusted``;
``--strict-records`` rejects them instead:
- ``image_tags_collapsed``: one image, several ``<image>`` tags in one human turn: every tag is
  removed and one put in front, as ``preprocess_multimodal`` does (``image_tag_mismatch``).
- ``image_tag_as_text``: a text-only record whose text holds ``<image>``: LLaVA tokenizes it as
  text (``image_tag_mismatch``).
- ``leading_gpt_turn_dropped``: a conversation starting with a ``gpt`` turn: ``preprocess_v1``
  skips that turn and trains on the rest (``bad_record``).

The scan streams a JSON file once and splits its records into unit files (JSON lines) under the
job's state folder, so each worker reads only its unit instead of re-parsing a 1 GB array.

Hostile records are rejects, never crashes: an ``image`` path must stay inside ``--image-root``
(no absolute path, no ``..``, no symlink leading out, no NUL, no over-long name) and name a
regular file of at most ``max_image_bytes`` (a FIFO or ``/dev/zero`` is never read); text with
a lone UTF-16 surrogate is "bad_text"; an entry nested too deeply for Python's JSON parser is
skipped by its brackets and rejected as "bad_json". What cannot be split into records at all
(invalid JSON syntax, no top-level array) stops the scan with an error naming the file.
"""

from __future__ import annotations

import codecs
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Iterator

from preprocessing.sources.base import (DEFAULT_MAX_IMAGE_BYTES, JobSettings, RawRecord, Scan,
                                        content_digest, lone_surrogate, make_key, printable)
from preprocessing.sources.options import option
from preprocessing.templates import IMAGE_TAG, Turn
from vwlmm_data import storage
from vwlmm_data.storage import S3Options

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
# A unit-file line standing for an entry the scan could not parse (its detail as the value);
# no LLaVA record has this field, and one that had would be a reject all the same.
UNREADABLE = "__vwlmm_unreadable__"
# The unit-file line standing for an entry whose text is over the limit: its id and the reject's
# detail, never its text, so no later step holds or tokenizes that text.
TOO_LARGE = "__vwlmm_text_too_large__"
# Conversations of LLaVA-665K and ShareGPT4V are a few KB; 1 MiB of text tokenizes in about a
# second, so a record costs at most that, while one of hundreds of MB would take a worker's
# memory (tokens as Python objects) and time.
DEFAULT_MAX_TEXT_BYTES = 1 << 20
_MAX_NAME_BYTES, _MAX_PATH_BYTES = 255, 4096  # POSIX NAME_MAX / PATH_MAX
# The names in a record's meta "adjusted": what LLaVA adjusts before training (module docstring).
ADJUSTMENTS = ("image_tags_collapsed", "image_tag_as_text", "leading_gpt_turn_dropped")


class Unreadable:
    """An array element ``iter_json_array`` skipped (nested deeper than the parser's limit)."""

    def __init__(self, detail: str):
        self.detail = detail


def _positional(index: int, origin: str, error: tuple[str, str]) -> RawRecord:
    """A record known only by its position (its entry has no usable id)."""
    return RawRecord(make_key("llava", f"{origin}-{index}"), printable(f"{origin}#{index}"),
                     error=error)


@dataclass(frozen=True)
class LlavaOptions:
    """LLaVA's bound on text, as ``--max-image-bytes`` bounds images, and whether records LLaVA
    trains on only after an adjustment are rejected."""

    max_text_bytes: int = option(DEFAULT_MAX_TEXT_BYTES, "reject a record whose conversation "
                                 "text has more UTF-8 bytes than this (text_too_large)", int)
    strict_records: bool = option(False, "reject what LLaVA trains on after an adjustment "
                                  "(several <image> tags in one turn, <image> as text in a "
                                  "text-only record, a leading gpt turn) instead of adjusting "
                                  "it as LLaVA does", bool)

    def __post_init__(self) -> None:
        if self.max_text_bytes < 1:
            raise ValueError(f"config field 'max_text_bytes'={self.max_text_bytes!r}: "
                             "must be >= 1")


def _parse_entry(entry, index: int, origin: str, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
                 strict: bool = False) -> tuple[RawRecord, list[str]]:
    """Validate one JSON entry; returns the record (without image bytes) and its image paths."""
    if isinstance(entry, dict) and UNREADABLE in entry:
        return _positional(index, origin, ("bad_json", f"entry {index}: {entry[UNREADABLE]}")), []
    if isinstance(entry, dict) and TOO_LARGE in entry:
        sid = printable(str(entry.get("id")))
        return RawRecord(make_key("llava", sid), sid, error=("text_too_large",
                                                               str(entry[TOO_LARGE]))), []
    if not isinstance(entry, dict):
        return _positional(index, origin, (
            "bad_record", f"entry {index} is {type(entry).__name__}, not an object")), []
    sid = printable(str(entry.get("id", f"{origin}#{index}")))
    rec = RawRecord(make_key("llava", sid), sid)
    bad = lone_surrogate(entry)
    if bad is not None:
        rec.error = ("bad_text", f"lone UTF-16 surrogate in {bad}")
        return rec, []
    conv = entry.get("conversations")
    if "id" not in entry:
        rec.error = ("bad_record", f"entry {index} has no 'id'")
        return rec, []
    if not isinstance(conv, list) or not conv:
        rec.error = ("bad_record", "'conversations' is missing or empty")
        return rec, []
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or t.get("from") not in ROLES:
            rec.error = ("bad_record", f"turn {i} needs 'from' in {sorted(ROLES)} and a string 'value'")
            return rec, []
        turns.append(Turn(ROLES[t["from"]], t["value"]))
    size = sum(_utf8_len(t.text) for t in turns)
    if size > max_text_bytes:
        rec.error = ("text_too_large", f"{size} bytes of text > {max_text_bytes}")
        return rec, []
    image = entry.get("image")
    paths = [image] if isinstance(image, str) else list(image) if isinstance(image, list) else []
    if image is not None and (not paths or not all(isinstance(p, str) and p for p in paths)):
        rec.error = ("bad_record", f"'image' must be a path or a list of paths, got {image!r}")
        return rec, []
    rec.meta = {"image": image} if image is not None else {}
    if len(turns) > 1 and turns[0].role == "gpt":
        if strict:
            rec.error = ("bad_record", "turn 0 is from 'gpt', expected 'human'")
            return rec, []
        turns = turns[1:]
        rec.meta.setdefault("adjusted", []).append("leading_gpt_turn_dropped")
    rec.turns = turns
    _place_image_tags(rec, len(paths), strict)
    return rec, paths


def _place_image_tags(rec: RawRecord, num_images: int, strict: bool = False) -> None:
    tags = sum(t.text.count(IMAGE_TAG) for t in rec.turns if t.role == "human")
    if num_images == 0:
        if any(IMAGE_TAG in t.text for t in rec.turns):
            if strict:
                rec.error = ("image_tag_mismatch", f"{tags} {IMAGE_TAG} tag(s) but no image")
            else:
                rec.meta.setdefault("adjusted", []).append("image_tag_as_text")
        return
    if num_images > 1:
        if tags != num_images:
            rec.error = ("image_tag_mismatch", f"{tags} {IMAGE_TAG} tag(s) for {num_images} images")
        return
    holding = [t for t in rec.turns if t.role == "human" and IMAGE_TAG in t.text]
    if tags > 1 and (strict or len(holding) > 1):
        # in several turns LLaVA would put one tag in front of each: more placeholders than
        # images, which its model cannot fill
        rec.error = ("image_tag_mismatch", f"{tags} {IMAGE_TAG} tags for one image")
        return
    if tags > 1:
        rec.meta.setdefault("adjusted", []).append("image_tags_collapsed")
    humans = [i for i, t in enumerate(rec.turns) if t.role == "human"]
    if not humans:
        rec.error = ("bad_record", "no human turn to hold the image")
        return
    at = next((i for i in humans if IMAGE_TAG in rec.turns[i].text), None)
    if at is None:
        at = humans[0]
        rec.meta["image_tag_added"] = True
    turns = list(rec.turns)
    text = (IMAGE_TAG + "\n" + turns[at].text.replace(IMAGE_TAG, "").strip()).strip()
    if text != turns[at].text and IMAGE_TAG in turns[at].text:
        rec.meta["image_tag_moved"] = True
    turns[at] = Turn("human", text)
    rec.turns = turns


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def image_uri(image_root: str, path: str) -> tuple[str | None, tuple[str, str] | None]:
    """(the file ``path`` names under ``image_root``, None) or (None, (reason, detail)).

    Lexical checks first (both local and S3), then, locally, the resolved path must stay
    below the resolved root: a symlink inside the root that leads out of it is refused.
    """
    shown = printable(path)[:200]
    if "\0" in path:
        return None, ("image_path_invalid", f"{shown!r} contains a NUL character")
    if _utf8_len(path) > _MAX_PATH_BYTES or \
            any(_utf8_len(part) > _MAX_NAME_BYTES for part in path.split("/")):
        return None, ("image_path_invalid", f"{shown!r}: name too long")
    norm = posixpath.normpath(path)
    if os.path.isabs(path) or "://" in path or norm == ".." or norm.startswith("../"):
        return None, ("image_path_outside_root", f"{shown!r} is not inside --image-root")
    uri = storage.join(image_root, norm)
    if not storage.is_s3(image_root):
        root = os.path.realpath(image_root)
        if not os.path.realpath(uri).startswith(root.rstrip(os.sep) + os.sep):
            return None, ("image_path_outside_root",
                          f"{shown!r} leads outside --image-root (symlink)")
    return uri, None


def _load_images(rec: RawRecord, paths: list[str], image_root: str, s3: S3Options,
                 max_bytes: int) -> None:
    for p in paths:
        uri, error = image_uri(image_root, p)
        if error is None:
            try:
                rec.images.append(storage.read_limited(uri, max_bytes, s3))
                continue
            except FileNotFoundError:
                error = ("image_missing", f"{uri} does not exist")
            except storage.FileTooLarge as exc:
                error = ("file_too_large", str(exc))
            except storage.NotRegularFile as exc:
                error = ("image_not_a_file", str(exc))
            except OSError as exc:  # a folder, a file used as a folder, permissions, ...
                error = ("image_unreadable", f"{uri}: {exc.strerror or exc}")
        rec.error = error
        rec.images = []
        return


def iter_json_array(stream, origin: str, chunk_bytes: int = 1 << 22) -> Iterator:
    """Yield the elements of a top-level JSON array, reading ``stream`` incrementally.

    LLaVA-665K / ShareGPT4V files are ~1 GB; ``json.load`` would hold all of it as Python
    objects (several GB). This keeps one read chunk plus one element in memory.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = stream.read(chunk_bytes)
        eof = not data
        buf = buf[pos:] + utf8.decode(data, final=eof)
        pos = 0
        return True

    def skip(chars: str) -> str:
        """Skip whitespace and ``chars``; the next significant character ('' at the end)."""
        nonlocal pos
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] in chars):
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos] if pos < len(buf) else ""

    if skip("") != "[":
        raise ValueError(f"{origin}: expected a JSON array of records")
    pos += 1
    while True:
        c = skip(",")
        if c == "]":
            return
        if c == "":
            raise ValueError(f"{origin}: JSON array is not closed")
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                # A number or literal cut at the buffer end can parse short: need what follows.
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as exc:
                if eof:
                    raise ValueError(f"{origin}: not valid JSON: {exc}") from exc
            except RecursionError:
                end = _bracketed_end(buf, pos)
                if end is not None:
                    obj = Unreadable("nested too deeply to parse")
                    break
                if eof:
                    raise ValueError(f"{origin}: JSON ends inside a record") from None
            if not more():
                raise ValueError(f"{origin}: JSON ends inside a record")
        pos = end
        yield obj


def _bracketed_end(buf: str, pos: int) -> int | None:
    """End of the ``[...]`` / ``{...}`` value at ``buf[pos]`` by bracket matching (strings
    skipped), for values too deep to decode; None when ``buf`` ends first."""
    depth, i, in_string = 0, pos, False
    while i < len(buf):
        c = buf[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _unit_line(entry, index: int, origin: str,
               max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> tuple[str, RawRecord]:
    """One entry as its unit-file line (valid UTF-8 JSON) and its parsed record."""
    try:
        if isinstance(entry, Unreadable):
            raise RecursionError(entry.detail)
        rec, _ = _parse_entry(entry, index, origin, max_text_bytes)
        if rec.error is not None and rec.error[0] == "text_too_large":
            return json.dumps({TOO_LARGE: rec.error[1], "id": rec.source_id}), rec
        line = json.dumps(entry, ensure_ascii=False, sort_keys=True)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: the \\u escape keeps them (a reject)
            line = json.dumps(entry, sort_keys=True)
    except RecursionError:
        detail = entry.detail if isinstance(entry, Unreadable) else "nested too deeply to parse"
        line = json.dumps({UNREADABLE: detail})
        rec, _ = _parse_entry({UNREADABLE: detail}, index, origin)
    return line, rec


def _unit_lines(data: bytes) -> list[str]:
    """The lines of a unit file: split at \\n only (JSON text may hold U+2028 and friends,
    which ``str.splitlines`` would also split at)."""
    text = data.decode("utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n") if text else []


def split(json_uri: str, records_prefix: str, chunk: int, s3: S3Options = S3Options(),
          max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[str]:
    """Stream a JSON array into unit files of ``chunk`` records (JSON lines); each record's key.

    Dedup digests need the images, so they are computed per unit, in parallel (``digests``).
    """
    origin = json_uri.rsplit("/", 1)[-1]
    out: list[str] = []
    part: list[str] = []

    def flush() -> None:
        storage.write_bytes(f"{records_prefix}-{(len(out) - 1) // chunk:06d}.jsonl",
                            "".join(part).encode(), s3)
        part.clear()

    with storage.open_read(json_uri, s3) as f:
        for i, entry in enumerate(iter_json_array(f, json_uri)):
            line, rec = _unit_line(entry, i, origin, max_text_bytes)
            part.append(line + "\n")
            out.append(rec.key)
            if len(part) == chunk:
                flush()
    if part:
        flush()
    return out


def digests(records_uri: str, first_index: int, image_root: str, origin: str,
            s3: S3Options = S3Options(), max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
            strict: bool = False) -> list[str | None]:
    """Dedup digest (image bytes + conversation) of each record of one unit file."""
    out = []
    for rec in read_unit(records_uri, first_index, image_root, origin, s3, max_bytes, strict):
        text = json.dumps([[t.role, t.text] for t in rec.turns])
        out.append(content_digest(rec.images, text) if rec.error is None else None)
    return out


def read_unit(records_uri: str, first_index: int, image_root: str, origin: str,
              s3: S3Options = S3Options(), max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
              strict: bool = False) -> Iterator[RawRecord]:
    for i, line in enumerate(_unit_lines(storage.read_bytes(records_uri, s3))):
        try:
            rec, paths = _parse_entry(json.loads(line), first_index + i, origin, strict=strict)
        except RecursionError:  # parsed at the scan's stack depth, not at this one
            rec, paths = _parse_entry({UNREADABLE: "nested too deeply to parse"},
                                      first_index + i, origin)
        if rec.error is None:
            _load_images(rec, paths, image_root, s3, max_bytes)
        yield rec


class LlavaSource:
    """Conversation JSON arrays: units are unit files the scan splits each array into under the
    job's state folder; digests need the images, so they are computed per unit."""

    name = "llava"
    aliases: tuple[str, ...] = ("sharegpt4v",)
    help = "LLaVA / ShareGPT4V conversation JSON + --image-root"
    needs_image_root = True
    options = LlavaOptions

    def input_files(self, files: list[str]) -> list[tuple[str, dict]]:
        return [(f, {}) for f in files]

    def scan(self, uri: str, cfg: JobSettings, scratch: str) -> Scan:
        sps = cfg.samples_per_shard
        keys = split(uri, scratch, sps, cfg.s3, cfg.source_options.max_text_bytes)
        origin = uri.rsplit("/", 1)[-1]
        units = [{"chunk": c // sps, "first_index": c, "origin": origin,
                  "num_records": min(sps, len(keys) - c)} for c in range(0, len(keys), sps)]
        return Scan(keys=keys, digests=None, units=units)

    @staticmethod
    def _unit_file(unit: dict) -> str:
        return f"{unit['scratch']}-{unit['chunk']:06d}.jsonl"

    def digests(self, unit: dict, cfg: JobSettings) -> list[str | None]:
        return digests(self._unit_file(unit), unit["first_index"], cfg.image_root, unit["origin"],
                       cfg.s3, cfg.max_image_bytes, cfg.source_options.strict_records)

    def read_unit(self, unit: dict, cfg: JobSettings) -> Iterator[RawRecord]:
        return read_unit(self._unit_file(unit), unit["first_index"], cfg.image_root,
                         unit["origin"], cfg.s3, cfg.max_image_bytes,
                         cfg.source_options.strict_records)

    def reject(self, rec: RawRecord, cfg: JobSettings) -> tuple[str, str] | None:
        return None

"""LLaVA / ShareGPT4V conversation JSON: ``[{id, image?, conversations: [{from, value}]}]``.

``image`` is a path relative to ``--image-root`` (or a list of them); entries without it are
text-only. As LLaVA's ``preprocess_multimodal`` does, a single image's ``<image>`` tag is moved
to the front of the human turn holding it: that turn becomes ``<image>\\n`` + its text without
the tag, stripped; every other turn is kept as written. The record's meta says
``image_tag_moved`` when that changed the text. A single image without a tag gets one in front
of the first human turn (``image_tag_added``; LLaVA would train on the text and ignore the
image). With several images the tags stay where they are and their count must match.

The scan streams a JSON file once and splits its records into unit files (JSON lines) under the
job's state folder, so each worker reads only its unit instead of re-parsing a 1 GB array.
"""

from __future__ import annotations

import codecs
import json
from typing import Iterator

from preprocessing import storage
from preprocessing.sources import RawRecord, content_digest, make_key
from preprocessing.templates import IMAGE_TAG, Turn

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def _parse_entry(entry, index: int, origin: str) -> tuple[RawRecord, list[str]]:
    """Validate one JSON entry; returns the record (without image bytes) and its image paths."""
    if not isinstance(entry, dict):
        return RawRecord(make_key("llava", f"{origin}-{index}"), f"{origin}#{index}",
                         error=("bad_record", f"entry {index} is {type(entry).__name__}, not an object")), []
    sid = str(entry.get("id", f"{origin}#{index}"))
    rec = RawRecord(make_key("llava", sid), sid)
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
    image = entry.get("image")
    paths = [image] if isinstance(image, str) else list(image) if isinstance(image, list) else []
    if image is not None and (not paths or not all(isinstance(p, str) and p for p in paths)):
        rec.error = ("bad_record", f"'image' must be a path or a list of paths, got {image!r}")
        return rec, []
    rec.meta = {"image": image} if image is not None else {}
    rec.turns = turns
    _place_image_tags(rec, len(paths))
    return rec, paths


def _place_image_tags(rec: RawRecord, num_images: int) -> None:
    tags = sum(t.text.count(IMAGE_TAG) for t in rec.turns if t.role == "human")
    if num_images == 0:
        if tags:
            rec.error = ("image_tag_mismatch", f"{tags} {IMAGE_TAG} tag(s) but no image")
        return
    if num_images > 1:
        if tags != num_images:
            rec.error = ("image_tag_mismatch", f"{tags} {IMAGE_TAG} tag(s) for {num_images} images")
        return
    if tags > 1:
        rec.error = ("image_tag_mismatch", f"{tags} {IMAGE_TAG} tags for one image")
        return
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


def _load_images(rec: RawRecord, paths: list[str], image_root: str) -> None:
    for p in paths:
        uri = storage.join(image_root, p)
        try:
            rec.images.append(storage.read_bytes(uri))
        except (FileNotFoundError, IsADirectoryError):
            rec.error = ("image_missing", f"{uri} does not exist")
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
            if not more():
                raise ValueError(f"{origin}: JSON ends inside a record")
        pos = end
        yield obj


def split(json_uri: str, records_prefix: str, chunk: int) -> list[dict]:
    """Stream a JSON array into unit files of ``chunk`` records (JSON lines); per record its key.

    Dedup digests need the images, so they are computed per unit, in parallel (``digests``).
    """
    origin = json_uri.rsplit("/", 1)[-1]
    out: list[dict] = []
    part: list[str] = []

    def flush() -> None:
        storage.write_bytes(f"{records_prefix}-{(len(out) - 1) // chunk:06d}.jsonl",
                            "".join(part).encode())
        part.clear()

    with storage.open_read(json_uri) as f:
        for i, entry in enumerate(iter_json_array(f, json_uri)):
            rec, _ = _parse_entry(entry, i, origin)
            part.append(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
            out.append({"key": rec.key, "digest": None})
            if len(part) == chunk:
                flush()
    if part:
        flush()
    return out


def digests(records_uri: str, first_index: int, image_root: str, origin: str) -> list[str | None]:
    """Dedup digest (image bytes + conversation) of each record of one unit file."""
    out = []
    for rec in read_unit(records_uri, first_index, image_root, origin):
        text = json.dumps([[t.role, t.text] for t in rec.turns])
        out.append(content_digest(rec.images, text) if rec.error is None else None)
    return out


def read_unit(records_uri: str, first_index: int, image_root: str, origin: str) -> Iterator[RawRecord]:
    for i, line in enumerate(storage.read_bytes(records_uri).decode().splitlines()):
        rec, paths = _parse_entry(json.loads(line), first_index + i, origin)
        if rec.error is None:
            _load_images(rec, paths, image_root)
        yield rec

"""LLaVA / ShareGPT4V conversation JSON: ``[{id, image?, conversations: [{from, value}]}]``.

``image`` is a path relative to ``--image-root`` (or a list of them); entries without it are
text-only. As LLaVA's ``preprocess_multimodal`` does, a single image's ``<image>`` tag is moved
to the front of the first human turn (``<image>\\n`` + question), wherever the JSON put it; the
record's meta says ``image_tag_moved`` when that changed the text. With several images the tags
stay where they are and their count must match.

The scan parses a JSON file once and splits its records into unit files (JSON lines) under the
job's state folder, so each worker reads only its unit instead of re-parsing a 1 GB array.
"""

from __future__ import annotations

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
    first = next((i for i, t in enumerate(rec.turns) if t.role == "human"), None)
    if first is None:
        rec.error = ("bad_record", "no human turn to hold the image")
        return
    turns = [Turn(t.role, t.text.replace(IMAGE_TAG, "").strip()) if t.role == "human" else t
             for t in rec.turns]
    turns[first] = Turn("human", IMAGE_TAG + "\n" + turns[first].text)
    if turns[first].text != rec.turns[first].text:
        rec.meta["image_tag_moved"] = True
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


def scan(json_uri: str, image_root: str, records_prefix: str, chunk: int) -> list[dict]:
    """Split a JSON array into unit files of ``chunk`` records; per record key + digest."""
    try:
        entries = json.loads(storage.read_bytes(json_uri))
    except ValueError as exc:
        raise ValueError(f"{json_uri}: not valid JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise ValueError(f"{json_uri}: expected a JSON array of records, got {type(entries).__name__}")
    out = []
    origin = json_uri.rsplit("/", 1)[-1]
    for c in range(0, max(len(entries), 1), chunk):
        part = entries[c:c + chunk]
        lines = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in part)
        storage.write_bytes(f"{records_prefix}-{c // chunk:06d}.jsonl", lines.encode())
        for i, entry in enumerate(part):
            rec, paths = _parse_entry(entry, c + i, origin)
            digest = None
            if rec.error is None:
                _load_images(rec, paths, image_root)
                if rec.error is None:
                    text = json.dumps([[t.role, t.text] for t in rec.turns])
                    digest = content_digest(rec.images, text)
            out.append({"key": rec.key, "digest": digest, "chunk": c // chunk})
    return out


def read_unit(records_uri: str, first_index: int, image_root: str, origin: str) -> Iterator[RawRecord]:
    for i, line in enumerate(storage.read_bytes(records_uri).decode().splitlines()):
        rec, paths = _parse_entry(json.loads(line), first_index + i, origin)
        if rec.error is None:
            _load_images(rec, paths, image_root)
        yield rec

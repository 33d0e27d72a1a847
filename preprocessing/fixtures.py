"""Small, real LAION-style and LLaVA-style inputs built from scikit-image's sample photos.

Used by ``make demo``, the tests, the benchmark and the README's quick start
(``python -m preprocessing.fixtures DIR``), so every stage downstream (the trainer included)
can build a real dataset without network access. ``write_demo_dataset(variants=True)``
adds every odd-but-valid image form (CMYK, palette, transparency, 16-bit, greyscale, EXIF
rotation) and every bad-input class, and returns the outcome each record must have.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# Filter settings under which ``expected`` holds (pass them to the config / CLI).
FIXTURE_FILTERS = {
    "max_punsafe": 0.5, "max_pwatermark": 0.8, "min_similarity": 0.25,
    "max_caption_chars": 400, "max_aspect_ratio": 5.0, "max_image_pixels": 1_500_000,
    "min_image_side": 16,
}
_PHOTOS = [  # (skimage.data name, caption)
    ("astronaut", "An astronaut in a white suit poses in front of an American flag."),
    ("chelsea", "A tabby cat looks to the side against a light background."),
    ("coffee", "A cup of coffee on a saucer with a spoon, seen from above."),
    ("rocket", "A rocket stands on the launch pad under a blue sky."),
    ("camera", "A black and white photo of a man operating a camera on a tripod."),
    ("coins", "Old coins laid out in rows on a dark surface."),
    ("hubble_deep_field", "Distant galaxies of many colours in the Hubble deep field."),
    ("immunohistochemistry", "A stained tissue sample under a microscope."),
    ("retina", "A photograph of the back of a human eye showing blood vessels."),
    ("moon", "A grey close-up of the cratered surface of the moon."),
    ("page", "A scanned page of printed text."),
    ("brick", "A close-up of a grey brick wall."),
]


def _photo(name: str, max_side: int) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype != np.uint8:
        arr = (arr / max(arr.max(), 1) * 255).astype(np.uint8)
    im = Image.fromarray(arr)
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return im


def _encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def odd_images(max_side: int) -> dict[str, bytes]:
    """Valid images in every awkward form the pipeline must normalise to RGB."""
    rgb = _photo("astronaut", max_side)
    grey = _photo("camera", max_side)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    palette_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette_t.info["transparency"] = 0
    return {
        "cmyk": _encode(rgb.convert("CMYK")),
        "palette": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette_transparent": _encode(palette_t, "PNG", transparency=0),
        "la": _encode(grey.convert("LA"), "PNG"),
        "rgba": _encode(rgba, "PNG"),
        "gray16": _encode(Image.fromarray((np.asarray(grey, np.uint16) * 257)), "PNG"),
        "grayscale_jpeg": _encode(grey),
        "exif_rotated": _encode(_photo("chelsea", max_side), exif=exif),
        "webp": _encode(_photo("coffee", max_side), "WEBP"),
    }


def bad_images(max_side: int) -> dict[str, tuple[bytes, str]]:
    """(bytes, expected reject reason) for each class of broken image (FIXTURE_FILTERS apply)."""
    good = _encode(_photo("rocket", max_side))
    bomb = _encode(Image.new("L", (1300, 1300)), "PNG")  # tiny file, 1.69 Mpx > 1.5 Mpx limit
    return {
        "truncated": (good[: len(good) // 2], "image_corrupt"),
        "garbage": (b"this is not an image" * 20, "image_corrupt"),
        "bomb": (bomb, "image_too_large"),
        "tiny": (_encode(Image.new("RGB", (8, 8), (200, 10, 10))), "image_too_small"),
        "panorama": (_encode(Image.new("RGB", (200, 20), (10, 200, 10))), "aspect_ratio_too_large"),
    }


@dataclass
class DemoDataset:
    root: Path
    laion_tars: list[Path]
    laion_parquets: list[Path]
    llava_json: list[Path]
    image_root: Path
    # source_id -> "ok" or the expected reject reason (under FIXTURE_FILTERS, template vicuna_v1
    # for LLaVA; with the plain template multi-turn LLaVA records are 'template_incompatible').
    laion_expected: dict[str, str] = field(default_factory=dict)
    llava_expected: dict[str, str] = field(default_factory=dict)
    llava_multi_turn: set[str] = field(default_factory=set)

    @property
    def laion_inputs(self) -> list[str]:
        return [str(p) for p in self.laion_tars + self.laion_parquets]


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime = len(data), 1700000000
                tf.addfile(ti, io.BytesIO(data))


def _laion(root: Path, ds: DemoDataset, max_side: int, variants: bool, per_tar: int) -> None:
    """img2dataset layout: NNNNN.tar (jpg/txt/json) + NNNNN.parquet (key, url, caption, scores)."""
    rows_by_tar: list[list[dict]] = [[], []]
    samples_by_tar: list[list] = [[], []]

    def add(t: int, image: bytes | None, caption: str, expect: str, in_parquet: bool = True,
            **scores) -> None:
        key = f"{t:05d}{len(samples_by_tar[t]):04d}"
        row = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": caption,
               "punsafe": scores.get("punsafe", 0.01), "pwatermark": scores.get("pwatermark", 0.05),
               "similarity": scores.get("similarity", 0.33), "status": "success"}
        members = {"txt": caption.encode(),
                   "json": json.dumps({"key": key, "url": row["url"], "caption": caption}).encode()}
        if image is not None:
            members = {"jpg": image, **members}
        samples_by_tar[t].append((key, members))
        if in_parquet:
            rows_by_tar[t].append(row)
        ds.laion_expected[key] = expect

    photos = [(_encode(_photo(n, max_side)), c) for n, c in _PHOTOS]
    for i in range(per_tar * 2):
        img, cap = photos[i % len(photos)]
        if i >= len(photos):  # more samples than photos: vary pixels so they are not duplicates
            im = Image.open(io.BytesIO(img)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img, cap = _encode(im), cap + f" (mirrored, {i})"
        add(i % 2, img, cap, "ok")
    if variants:
        for name, data in odd_images(max_side).items():
            add(0, data, f"A photo stored as {name}.", "ok")
        for name, (data, reason) in bad_images(max_side).items():
            add(1, data, f"A broken photo: {name}.", reason)
        add(0, photos[0][0], photos[0][1], "duplicate")  # same bytes + text as the first sample
        add(1, photos[1][0], "Unsafe picture.", "unsafe", punsafe=0.9)
        add(1, photos[2][0], "Watermarked picture.", "watermark", pwatermark=0.95)
        add(0, photos[3][0], "Unrelated caption.", "low_similarity", similarity=0.1)
        add(0, photos[4][0], "", "caption_too_short")
        add(1, photos[5][0], "word " * 120, "caption_too_long")
        add(1, photos[6][0], "A caption whose sample has no parquet row.", "metadata_missing",
            in_parquet=False)
        add(0, None, "A sample whose image failed to download.", "image_missing")
    for t in range(2):
        tar = root / "laion" / f"{t:05d}.tar"
        tar.parent.mkdir(parents=True, exist_ok=True)
        _write_tar(tar, samples_by_tar[t])
        pq.write_table(pa.Table.from_pylist(rows_by_tar[t]), tar.with_suffix(".parquet"))
        ds.laion_tars.append(tar)
        ds.laion_parquets.append(tar.with_suffix(".parquet"))


def _llava(root: Path, ds: DemoDataset, max_side: int, variants: bool) -> None:
    images = root / "llava_images"
    entries: list[dict] = []

    def add(entry: dict, expect: str, multi: bool = False) -> None:
        entries.append(entry)
        ds.llava_expected[str(entry.get("id"))] = expect
        if multi:
            ds.llava_multi_turn.add(str(entry["id"]))

    def save(rel: str, data: bytes) -> str:
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(data)
        return rel

    for i, (name, caption) in enumerate(_PHOTOS):
        rel = save(f"coco/train2017/{i:012d}.jpg", _encode(_photo(name, max_side)))
        add({"id": f"{i:012d}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": caption}]}, "ok")
    add({"id": "multi.turn/1", "image": "coco/train2017/000000000000.jpg", "conversations": [
        {"from": "human", "value": "What is in the picture?\n<image>"},  # tag at the end: moved
        {"from": "gpt", "value": "An astronaut."},
        {"from": "human", "value": "What colour is the suit?"},
        {"from": "gpt", "value": "The suit is white, with a flag patch on the shoulder."}]},
        "ok", multi=True)
    add({"id": "text_only_1", "conversations": [
        {"from": "human", "value": "Write a haiku about autumn."},
        {"from": "gpt", "value": "Red leaves drift and fall,\ncold wind hums through empty trees,\nthe year exhales slow."}]},
        "ok")
    if variants:
        for name, data in odd_images(max_side).items():
            rel = save(f"odd/{name}.img", data)
            add({"id": f"odd_{name}", "image": rel, "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": f"A photo stored as {name}."}]}, "ok")
        for name, (data, reason) in bad_images(max_side).items():
            rel = save(f"bad/{name}.jpg", data)
            add({"id": f"bad_{name}", "image": rel, "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "Something."}]}, reason)
        add({"id": "missing_file", "image": "coco/train2017/does_not_exist.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Nothing."}]},
            "image_missing")
        add({"id": "no_conversations", "image": "coco/train2017/000000000001.jpg"}, "bad_record")
        # A text-only record whose text holds the literal "<image>": tokenized as text, as LLaVA
        # does (counted as image_tag_as_text; --strict-records rejects it).
        add({"id": "tag_without_image", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "?"}]},
            "ok")
        add({"id": "dup_of_first", "image": "coco/train2017/000000000000.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": _PHOTOS[0][1]}]}, "duplicate")
        add({"id": "very_long", "conversations": [
            {"from": "human", "value": "Repeat."}, {"from": "gpt", "value": "blah " * 3000}]}, "too_long")
    ds.image_root = images
    half = (len(entries) + 1) // 2
    for j, part in enumerate((entries[:half], entries[half:])):
        path = root / f"llava_{j}.json"
        path.write_text(json.dumps(part, indent=1))
        ds.llava_json.append(path)


def write_demo_dataset(out_dir: str | os.PathLike, *, variants: bool = False, max_side: int = 96,
                       laion_per_tar: int = 6) -> DemoDataset:
    """Write LAION-style (2 tars + parquets) and LLaVA-style (2 JSON files + images) inputs.

    ``variants=True`` adds the odd and bad forms with their expected outcomes; ``max_side``
    bounds the photos' size (small keeps tests fast).
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    ds = DemoDataset(root=root, laion_tars=[], laion_parquets=[], llava_json=[], image_root=root)
    _laion(root, ds, max_side, variants, laion_per_tar)
    _llava(root, ds, max_side, variants)
    return ds


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.fixtures",
        description="Write the bundled fixture inputs (the ones `make demo` uses): LAION-style "
                    "img2dataset shards (OUT/laion/NNNNN.tar + .parquet) and LLaVA JSON "
                    "(OUT/llava_N.json) with its image folder (OUT/llava_images).")
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--variants", action="store_true",
                        help="add every odd and broken record form (each a counted reject)")
    args = parser.parse_args(argv)
    ds = write_demo_dataset(args.out, variants=args.variants, max_side=96, laion_per_tar=16)
    print(f"LAION-style inputs: {' '.join(ds.laion_inputs)}\n"
          f"LLaVA inputs: {' '.join(map(str, ds.llava_json))} (--image-root {ds.image_root})")


if __name__ == "__main__":
    main()

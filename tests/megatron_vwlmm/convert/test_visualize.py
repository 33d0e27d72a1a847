"""vwlmm-visualize: a PNG of the image's size with one label per patch, and the token table."""

from __future__ import annotations

import numpy as np


def test_visualize_png_and_table(llava_export, tmp_path, monkeypatch):
    from PIL import Image

    from megatron_vwlmm.convert import visualize

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    image.save(tmp_path / "in.png")
    drawn = []
    from PIL import ImageDraw

    real_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **k: (drawn.append(text),
                                                         real_text(self, xy, text, *a, **k)))
    assert visualize.main(["--model", str(llava_export), "--image", str(tmp_path / "in.png"),
                           "--out", str(tmp_path / "words.png")]) == 0
    out = Image.open(tmp_path / "words.png")
    assert out.size == image.size
    assert len(drawn) == 16  # 4 x 4 patches of the tiny CLIP
    table = (tmp_path / "words.txt").read_text().splitlines()
    assert len(table) == 4 and all(len(row.split()) == 4 for row in table)
    assert [t for row in table for t in row.split()] == drawn
    assert not np.array_equal(np.asarray(out), np.asarray(image))

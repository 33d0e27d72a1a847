"""vwlmm-visualize: an upscaled PNG with a token/probability label per patch, and the table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

GRID = 4  # 4 x 4 patches of the tiny CLIP (image_size 32, patch_size 8)


@pytest.fixture
def drawn_texts(monkeypatch):
    """Every ``ImageDraw.text`` call as ((x, y), text)."""
    from PIL import ImageDraw

    calls = []
    real_text = ImageDraw.ImageDraw.text

    def text(self, xy, text, *a, **k):
        calls.append((xy, text))
        return real_text(self, xy, text, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return calls


def random_image(width, height, seed=0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def read_table(path):
    """[[(token, probability text)]] from the .txt table."""
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        rows.append(list(zip(parts[0::2], parts[1::2])))
    return rows


def reference_words(model_dir, image):
    """Top-1 token and max softmax probability per patch, straight from the exported model."""
    from transformers import AutoProcessor

    from megatron_vwlmm.convert.modeling_vwlmm import VWLMMForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = VWLMMForConditionalGeneration.from_pretrained(model_dir).eval()
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model.visual_word_logits(pixels)[0].double()
    probs = torch.exp(logits.max(-1).values - torch.logsumexp(logits, -1))
    tokens = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return tokens, probs.numpy()


def labels_by_cell(drawn, size):
    """{(row, col): [lines]} of the drawn labels, located by where they were drawn; the grid
    covers the square the image was padded to, centred on it."""
    square = max(size)
    cell = square / GRID
    off_x, off_y = (square - size[0]) / 2, (square - size[1]) / 2
    cells = {}
    for (x, y), text in drawn:
        key = (int((y + off_y) // cell), int((x + off_x) // cell))
        cells.setdefault(key, []).append(text)
    return cells


def test_visualize_png_and_table(llava_export, tmp_path, drawn_texts):
    from PIL import Image

    from megatron_vwlmm.convert import visualize

    image = random_image(48, 48)
    image.save(tmp_path / "in.png")
    assert visualize.main(["--model", str(llava_export), "--image", str(tmp_path / "in.png"),
                           "--out", str(tmp_path / "words.png")]) == 0
    out = Image.open(tmp_path / "words.png")
    assert out.size == (512, 512)  # a 48 px image drawn at 512 px
    table = read_table(tmp_path / "words.txt")
    assert [len(row) for row in table] == [GRID] * GRID

    tokens, probs = reference_words(llava_export, image)
    assert [t for row in table for t, _ in row] == tokens
    table_probs = np.array([float(p) for row in table for _, p in row])
    assert np.all((table_probs > 0) & (table_probs <= 1))
    np.testing.assert_allclose(table_probs, probs, rtol=5e-3)  # printed to 3 digits

    labels = labels_by_cell(drawn_texts, out.size)
    assert sorted(labels) == [(r, c) for r in range(GRID) for c in range(GRID)]
    for (r, c), lines in labels.items():
        assert lines == list(table[r][c])
    plain = np.asarray(image.resize(out.size, Image.Resampling.LANCZOS))
    assert not np.array_equal(np.asarray(out), plain)


def test_visualize_wide_image_labels_only_cells_on_the_image(llava_export, tmp_path,
                                                              drawn_texts):
    """96x48 is padded to 96x96: grid rows 0 and 3 lie in the padding and get no label."""
    from PIL import Image

    from megatron_vwlmm.convert.visualize import visualize

    random_image(96, 48, seed=1).save(tmp_path / "wide.png")
    png, txt = visualize(str(llava_export), str(tmp_path / "wide.png"), str(tmp_path / "w.png"))
    out = Image.open(png)
    assert out.size == (512, 256)
    table = read_table(txt)
    assert len(table) == GRID
    labels = labels_by_cell(drawn_texts, out.size)
    assert sorted(labels) == [(r, c) for r in (1, 2) for c in range(GRID)]
    for (r, c), lines in labels.items():
        assert lines == list(table[r][c])


@pytest.mark.parametrize("size, grid, expected", [
    ((48, 48), 4, (512, 512)),        # small: raised to 512
    ((96, 48), 4, (512, 256)),        # aspect ratio kept
    ((700, 350), 4, (700, 350)),      # already large enough: kept
    ((336, 336), 24, (1536, 1536)),   # at least 64 px per cell
    ((4000, 3000), 24, (2048, 1536)),  # capped
])
def test_render_size(size, grid, expected):
    from megatron_vwlmm.convert.visualize import render_size

    assert render_size(size, grid) == expected


def test_fit_text_truncates_with_ellipsis():
    from megatron_vwlmm.convert.visualize import ELLIPSIS, fit_text, load_font

    font = load_font(20)
    assert fit_text("▁cat", font, 200) == "▁cat"
    cut = fit_text("▁supercalifragilistic", font, 60)
    assert cut.endswith(ELLIPSIS) and "▁supercalifragilistic".startswith(cut[:-1])
    assert 1 < len(cut) < len("▁supercalifragilistic") and font.getlength(cut) <= 60
    assert fit_text("▁supercalifragilistic", font, 1) == ELLIPSIS


def test_label_font_fits_the_widest_probability():
    from megatron_vwlmm.convert.visualize import label_font, load_font

    assert label_font(128, 112, ["0.42"]) is load_font(25)  # a fifth of the cell
    font = label_font(64, 52, ["0.5", "3.13e-05"])
    assert font.getlength("3.13e-05") <= 52 < load_font(12).getlength("3.13e-05")


def test_label_lines():
    from megatron_vwlmm.convert.visualize import VisualWord

    assert VisualWord("▁cat", 0.4237).label() == ("▁cat", "0.424")
    assert VisualWord("a b\n", 1.0).label() == ("a\\x20b\\x0a", "1")
    assert VisualWord("", 3.1e-5).label() == ("''", "3.1e-05")


def test_top_visual_words_is_softmax_max():
    from megatron_vwlmm.convert.visualize import top_visual_words

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    probs, ids = top_visual_words(logits)
    assert ids.tolist() == [0, 2]
    torch.testing.assert_close(probs, torch.softmax(logits, -1).max(-1).values)
    torch.testing.assert_close(probs[0], torch.tensor(np.e ** 2 / (np.e ** 2 + 2),
                                                      dtype=torch.float32))

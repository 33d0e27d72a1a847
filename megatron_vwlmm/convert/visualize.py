"""``vwlmm-visualize``: the paper's Fig. 10 — each image patch's top-1 visual word and its
probability, drawn on a grid over the image, plus the same grid as a text table.

The visual word of patch p is argmax_v softmax(W_vm x_p)_v and its probability is that softmax's
maximum (paper Sec. 3), from a llava-hf export loaded with ``VWLMMForConditionalGeneration``.
The processor pads the image to a square (LLaVA's pad mode) before resizing, so the patch grid
covers that square; cells are mapped back onto the original image, and cells that fall wholly
in the padding get no label (the table still lists them, so it keeps the model's full grid).

Rendering choices:
- Size: the long side is the original's, raised to at least 512 px and to at least 64 px per
  grid cell, and capped at 2048 px; the aspect ratio is kept. A 96 px demo image with a 4x4 grid
  becomes 512 px (128 px cells); a 336 px LLaVA image with 24x24 patches becomes 1536 px. The cap
  keeps a large photo's PNG reasonable. The image is resampled with Lanczos.
- Labels: token on the first line, probability to 3 significant digits on the second (0.424,
  0.00873, 1), centred in the cell on a semi-transparent dark box; the table has the same two
  strings. The font size follows the cell size; a token wider than the cell is cut and ends in
  "…" (the table keeps the whole token).
- Tokens are shown as the tokenizer's vocabulary spells them (SentencePiece's "▁" word-start
  marker, byte-level BPE's "Ġ"), so a label can be looked up in the vocabulary; whitespace and
  control characters inside a token are escaped (``\\x0a``) so each token is one visible word.
- Font: DejaVu Sans from matplotlib's data folder (it has "▁", "Ġ" and "…"); without it,
  Pillow's default font at the same size (Pillow >= 10.1), else its fixed bitmap font.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

MIN_LONG_SIDE = 512
MIN_CELL_PX = 64
MAX_LONG_SIDE = 2048
ELLIPSIS = "…"


@dataclass(frozen=True)
class VisualWord:
    """One patch's top-1 visual word: the token and its probability softmax(W_vm x_p)_v."""

    token: str
    prob: float

    def label(self) -> Tuple[str, str]:
        """The two lines shown for this patch, in the picture and in the table."""
        shown = "".join(c if c.isprintable() and not c.isspace() else _escape(c)
                        for c in self.token)
        return shown or "''", f"{self.prob:.3g}"


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def top_visual_words(visual_word_logits):
    """(probability, token id) of each patch's most likely visual word; logits [..., V]."""
    return visual_word_logits.float().softmax(dim=-1).max(dim=-1)


def require_processor(model_dir: str) -> None:
    """FileNotFoundError saying how to get one when ``model_dir`` has no tokenizer (the labels
    are its tokens): an export written without a tokenizer."""
    from megatron_vwlmm.convert.processor import is_tokenizer_dir

    if not is_tokenizer_dir(model_dir):
        raise FileNotFoundError(
            f"{model_dir} has no processor (it was exported without a tokenizer); export again "
            "with `vwlmm-convert export --checkpoint <checkpoint> --out <new folder> --tokenizer "
            "<HF tokenizer folder>`")


def visual_word_grid(model_dir: str, image) -> List[List[VisualWord]]:
    """Top-1 visual word and its probability of every patch, as rows x columns."""
    import torch
    from transformers import AutoProcessor

    from megatron_vwlmm.convert.modeling_vwlmm import VWLMMForConditionalGeneration

    require_processor(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = VWLMMForConditionalGeneration.from_pretrained(model_dir).eval()
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs, ids = top_visual_words(model.visual_word_logits(pixels.to(model.dtype))[0])
    side = int(round(len(ids) ** 0.5))
    words = [VisualWord(t, p) for t, p in
             zip(processor.tokenizer.convert_ids_to_tokens(ids.tolist()), probs.tolist())]
    return [words[r * side:(r + 1) * side] for r in range(side)]


def render_size(size: Tuple[int, int], grid_side: int) -> Tuple[int, int]:
    """(width, height) of the PNG for an image of ``size`` under a ``grid_side``^2 patch grid."""
    width, height = size
    long_side = max(width, height)
    target = min(max(MIN_LONG_SIDE, MIN_CELL_PX * grid_side, long_side), MAX_LONG_SIDE)
    scale = target / long_side
    return max(1, round(width * scale)), max(1, round(height * scale))


@functools.lru_cache(maxsize=None)
def load_font(size: int):
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(
            str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType
        return ImageFont.load_default()


def label_font(cell: float, max_width: float, probs: Sequence[str]):
    """One font for every label: a fifth of the cell high, smaller if the widest probability
    (never truncated: a cut number would read as another number) is wider than the cell."""
    size = max(8, min(40, int(cell * 0.2)))
    widest = max(load_font(size).getlength(p) for p in probs)
    if widest > max_width:
        size = max(8, int(size * max_width / widest))
    return load_font(size)


def fit_text(text: str, font, max_width: float) -> str:
    """``text``, or its longest prefix + "…" that is at most ``max_width`` pixels wide."""
    if font.getlength(text) <= max_width:
        return text
    for end in range(len(text) - 1, 0, -1):
        if font.getlength(text[:end] + ELLIPSIS) <= max_width:
            return text[:end] + ELLIPSIS
    return ELLIPSIS


def cell_boxes(size: Tuple[int, int], grid_side: int):
    """(row, col, (x0, y0, x1, y1)) of every cell that overlaps the image, clipped to it.

    The grid covers the square the processor padded the image to, centred on the image."""
    width, height = size
    square = max(width, height)
    off_x, off_y = (square - width) / 2, (square - height) / 2
    cell = square / grid_side
    for r in range(grid_side):
        for c in range(grid_side):
            x0, y0 = c * cell - off_x, r * cell - off_y
            x1, y1 = x0 + cell, y0 + cell
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                continue  # padding cell, outside the image
            yield r, c, (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))


def draw_grid(image, grid: Sequence[Sequence[VisualWord]]):
    """The image, resized by ``render_size``, with a token/probability label per patch cell."""
    from PIL import Image, ImageDraw

    size = render_size(image.size, len(grid))
    canvas = image.convert("RGB").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    cell = max(size) / len(grid)
    pad = max(2, round(cell * 0.03))
    max_width = cell - 4 * pad
    font = label_font(cell, max_width, [w.label()[1] for row in grid for w in row])
    left, top, _, bottom = font.getbbox("Ag")
    line_h, gap = bottom - top, max(1, (bottom - top) // 4)
    for r, c, (x0, y0, x1, y1) in cell_boxes(size, len(grid)):
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255, 140),
                       width=max(1, round(cell / 96)))
        token, prob = grid[r][c].label()
        lines = [fit_text(token, font, max_width), prob]
        widths = [font.getlength(t) for t in lines]
        box_w, box_h = max(widths) + 2 * pad, 2 * line_h + gap + 2 * pad
        # Centred on the visible part of the cell, shifted to stay inside the image.
        bx = min(max((x0 + x1 - box_w) / 2, 0), size[0] - box_w)
        by = min(max((y0 + y1 - box_h) / 2, 0), size[1] - box_h)
        draw.rounded_rectangle([bx, by, bx + box_w, by + box_h], radius=pad,
                               fill=(0, 0, 0, 150))
        for i, (text, w, colour) in enumerate(zip(lines, widths,
                                                  [(255, 255, 255, 255), (255, 215, 80, 255)])):
            draw.text((bx + (box_w - w) / 2 - left, by + pad + i * (line_h + gap) - top),
                      text, fill=colour, font=font)
    return Image.alpha_composite(canvas, overlay).convert("RGB")


def format_table(grid: Sequence[Sequence[VisualWord]]) -> str:
    """One line per grid row; each cell is ``token probability``, cells in aligned columns."""
    cells = [[" ".join(w.label()) for w in row] for row in grid]
    width = max(len(t) for row in cells for t in row)
    return "\n".join("  ".join(t.ljust(width) for t in row).rstrip() for row in cells)


def visualize(model_dir: str, image_path: str, out_png: str) -> Tuple[Path, Path]:
    """Write ``out_png`` (the labelled image) and the table next to it as ``.txt``."""
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    grid = visual_word_grid(model_dir, image)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    drawn = draw_grid(image, grid)
    drawn.save(out)
    table = out.with_suffix(".txt")
    table.write_text(format_table(grid) + "\n")
    log.info("%dx%d patch grid drawn at %dx%d px", len(grid), len(grid), *drawn.size)
    return out, table


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="vwlmm-visualize", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: vwlmm-visualize --model hf/x --image cat.jpg --out cat_words.png "
               "(also writes cat_words.txt)")
    p.add_argument("--model", required=True, help="llava-hf export of `vwlmm-convert export`")
    p.add_argument("--image", required=True, help="image file (any format PIL reads)")
    p.add_argument("--out", required=True,
                   help="output PNG; the token/probability table goes to the same name .txt")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vwlmm-visualize %(message)s")
    try:
        for path in (args.model, args.image):
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} does not exist")
        require_processor(args.model)
    except FileNotFoundError as exc:
        print(f"vwlmm-visualize: error: {exc}", file=sys.stderr)
        return 2
    png, table = visualize(args.model, args.image, args.out)
    print(table.read_text(), end="")
    print(f"vwlmm-visualize: wrote {png} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

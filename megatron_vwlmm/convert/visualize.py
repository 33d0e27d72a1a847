"""``vwlmm-visualize``: the paper's Fig. 10 — each image patch's top-1 visual word, drawn on a
grid over the image, plus the same table as text.

The visual word of patch p is argmax_v softmax(W_vm x_p)_v (paper Sec. 3), from a llava-hf export
loaded with ``VWLMMForConditionalGeneration``. The processor pads the image to a square (LLaVA's
pad mode) before resizing, so the patch grid covers that square; cells are mapped back onto the
original image and the PNG has the image's own size.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Tuple

log = logging.getLogger(__name__)


def visual_word_grid(model_dir: str, image) -> List[List[str]]:
    """Top-1 visual word of every patch, as rows x columns of decoded tokens."""
    import torch
    from transformers import AutoProcessor

    from megatron_vwlmm.convert.modeling_vwlmm import VWLMMForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = VWLMMForConditionalGeneration.from_pretrained(model_dir).eval()
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        words = model.visual_word_logits(pixels.to(model.dtype))[0].argmax(dim=-1)
    side = int(round(len(words) ** 0.5))
    tokens = processor.tokenizer.convert_ids_to_tokens(words.tolist())
    return [tokens[r * side:(r + 1) * side] for r in range(side)]


def draw_grid(image, grid: List[List[str]]):
    """The image with one label per patch cell (cells of the padded square mapped back)."""
    from PIL import ImageDraw, ImageFont

    canvas = image.convert("RGB").copy()
    width, height = canvas.size
    square = max(width, height)
    off_x, off_y = (square - width) / 2, (square - height) / 2
    cell = square / len(grid)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, row in enumerate(grid):
        for c, token in enumerate(row):
            x0, y0 = c * cell - off_x, r * cell - off_y
            if x0 + cell <= 0 or y0 + cell <= 0 or x0 >= width or y0 >= height:
                continue  # padding cell, outside the image
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], outline=(255, 255, 255))
            draw.text((x0 + 2, y0 + 2), token, fill=(255, 255, 0), font=font,
                      stroke_width=1, stroke_fill=(0, 0, 0))
    return canvas


def format_table(grid: List[List[str]]) -> str:
    width = max(len(t) for row in grid for t in row)
    return "\n".join(" ".join(t.ljust(width) for t in row) for row in grid)


def visualize(model_dir: str, image_path: str, out_png: str) -> Tuple[Path, Path]:
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    grid = visual_word_grid(model_dir, image)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(image, grid).save(out)
    table = out.with_suffix(".txt")
    table.write_text(format_table(grid) + "\n")
    return out, table


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="vwlmm-visualize", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: vwlmm-visualize --model hf/x --image cat.jpg --out cat_words.png "
               "(also writes cat_words.txt)")
    p.add_argument("--model", required=True, help="llava-hf export of `vwlmm-convert export`")
    p.add_argument("--image", required=True, help="image file (any format PIL reads)")
    p.add_argument("--out", required=True, help="output PNG; the token table goes to .txt")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vwlmm-visualize %(message)s")
    for path in (args.model, args.image):
        if not Path(path).exists():
            print(f"vwlmm-visualize: error: {path} does not exist", file=sys.stderr)
            return 2
    png, table = visualize(args.model, args.image, args.out)
    print(table.read_text(), end="")
    print(f"vwlmm-visualize: wrote {png} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

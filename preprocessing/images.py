"""Image decoding and normalisation to the vision encoder's input: bytes in, JPEG bytes out.

Every failure is an ``ImageReject`` carrying the reject reason, so one bad file never crashes a
worker. The modes are LLaVA-1.5's image path on the decoded RGB image (``PIL.Image.open(...)
.convert("RGB")``, no EXIF orientation unless ``exif_transpose``), before CLIP's rescale and
normalisation, which the trainer applies:

- ``pad``: LLaVA's ``expand2square`` (the image centred on a square of the encoder's mean colour
  as LLaVA computes it, ``int(mean * 255)``: (122, 116, 104) for CLIP, so padding normalises to
  ~0), then CLIP's bicubic resize. LLaVA-1.5 fine-tuning (``image_aspect_ratio="pad"``).
- ``crop``: CLIP's own preprocessing, short side to ``size`` (long side ``int(size * long /
  short)``, as transformers computes it), centre crop. LLaVA-1.5 pretraining ("square").
- ``resize``: squash to a square (no LLaVA stage uses it).

For RGB, greyscale, CMYK and opaque palette images the arrays before JPEG encoding are LLaVA's
bit for bit, and what the trainer reads differs only by the JPEG storage (quality
``jpeg_quality``, 4:4:4 chroma). Images with transparency are composited on the pad colour and
16-bit greyscale is rescaled by its range, where LLaVA's ``convert("RGB")`` drops the alpha
channel and clips.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vwlmm_data.encoders import get_encoder_kind

_RESAMPLE = Image.Resampling.BICUBIC  # as CLIPImageProcessor


class ImageReject(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageSettings:
    size: int = 336
    mode: str = "pad"  # pad | resize (squash) | crop (short side + centre crop, CLIP default)
    jpeg_quality: int = 95
    max_pixels: int = 89_478_485
    min_side: int = 10
    max_aspect_ratio: float | None = None
    exif_transpose: bool = False  # LLaVA ignores EXIF orientation
    jpeg_draft: bool = False  # reduced-scale JPEG decoding: faster, pixels no longer LLaVA's
    # The vision encoder's mean colour (VisionEncoderKind.pad_color); CLIP's by default.
    pad_color: tuple[int, int, int] = get_encoder_kind("clip").pad_color


# Pixels per band when 16/32-bit greyscale is rescaled: its float copy stays ~8 MB, so such an
# image costs about what an 8-bit one of the same size does (not 8 bytes a pixel more).
_BAND_PIXELS = 1 << 20


def _grey_to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit and float greyscale -> 8-bit "L", rescaled by the range (Pillow's convert()
    clips to 0..255), a band of rows at a time."""
    top = float(im.getextrema()[1])
    hi = 65535.0 if im.mode.startswith("I;16") or top > 255 else 255.0
    if im.mode == "F":
        hi = max(top, 1e-12)
    w, h = im.size
    out = np.empty((h, w), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(w, 1))
    for y in range(0, h, rows):
        band = np.asarray(im.crop((0, y, w, min(h, y + rows))), dtype=np.float64)
        out[y:y + rows] = np.clip(band / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _to_rgb(im: Image.Image, pad_color: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, compositing transparency onto the pad colour."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = _grey_to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, pad_color)
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB") if im.mode != "RGB" else im


def _fit(im: Image.Image, s: ImageSettings) -> Image.Image:
    w, h = im.size
    if s.mode == "pad":
        side = max(w, h)
        square = Image.new("RGB", (side, side), s.pad_color)
        square.paste(im, ((side - w) // 2, (side - h) // 2))
        return square.resize((s.size, s.size), _RESAMPLE)
    if s.mode == "resize":
        return im.resize((s.size, s.size), _RESAMPLE)
    # crop: transformers' get_resize_output_image_size (int() of the long side), center_crop
    short, long = sorted((w, h))
    long = int(s.size * long / short)
    im = im.resize((s.size, long) if w <= h else (long, s.size), _RESAMPLE)
    left, top = (im.width - s.size) // 2, (im.height - s.size) // 2
    return im.crop((left, top, left + s.size, top + s.size))


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open with Pillow's bomb check at our limit (restored after: it is a global)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def process_image(data: bytes, s: ImageSettings) -> bytes:
    """Decode, orient, convert, check, pad/resize and re-encode one image."""
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between 1x and 2x MAX_IMAGE_PIXELS; treat it as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = _open(data, s.max_pixels)
            w, h = im.size
            if w * h > s.max_pixels:
                raise ImageReject("image_too_large", f"{w}x{h} exceeds {s.max_pixels} pixels")
            if min(w, h) < s.min_side:
                raise ImageReject("image_too_small", f"{w}x{h}, minimum side is {s.min_side}")
            if s.max_aspect_ratio and max(w, h) / min(w, h) > s.max_aspect_ratio:
                raise ImageReject("aspect_ratio_too_large",
                                  f"{w}x{h}, ratio above {s.max_aspect_ratio}")
            if s.jpeg_draft and im.format == "JPEG" and s.mode != "crop":
                # Decode at a reduced DCT scale when the photo is much larger than the target:
                # several times faster, and every reduced side stays >= the target size.
                im.draft("RGB", (s.size, s.size))
            im.load()
            if s.exif_transpose:
                im = ImageOps.exif_transpose(im)
    except ImageReject:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReject("image_too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageReject("image_corrupt", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageReject("image_corrupt", f"{type(exc).__name__}: {exc}") from exc
    return encode_jpeg(fit_image(im, s), s.jpeg_quality)


def fit_image(im: Image.Image, s: ImageSettings) -> Image.Image:
    """A decoded image -> the RGB array the vision encoder sees (before JPEG storage)."""
    return _fit(_to_rgb(im, s.pad_color), s)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    """Storage: 4:4:4 chroma (no subsampling), which halves the error against the array."""
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality, subsampling=0)
    return out.getvalue()


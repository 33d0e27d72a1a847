"""Image normalisation: every odd mode to RGB at the vision size, pad colour, EXIF, rejects.
(Pixel equality with LLaVA's image path: test_llava_parity.py.)"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from preprocessing.fixtures import FIXTURE_FILTERS, bad_images, odd_images
from preprocessing.images import ImageReject, ImageSettings, process_image

S = ImageSettings(size=56, max_pixels=FIXTURE_FILTERS["max_image_pixels"],
                  min_side=FIXTURE_FILTERS["min_image_side"],
                  max_aspect_ratio=FIXTURE_FILTERS["max_aspect_ratio"])
PAD_COLOR = S.pad_color  # CLIP's mean colour, the default


def _decode(jpg: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(jpg))
    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (56, 56))
    return np.asarray(im, dtype=np.int16)


@pytest.mark.parametrize("name", sorted(odd_images(64)))
def test_odd_images_become_rgb(name):
    arr = _decode(process_image(odd_images(64)[name], S))
    assert arr.std() > 5  # real content survived (not a flat pad or a black frame)


def test_pad_uses_clip_mean_and_keeps_aspect():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    arr = _decode(process_image(buf.getvalue(), S))
    assert np.abs(arr[2, 28] - PAD_COLOR).max() <= 4  # top band is padding
    assert np.abs(arr[28, 28] - (255, 0, 0)).max() <= 6  # centre is the image
    arr = _decode(process_image(buf.getvalue(), ImageSettings(size=56, mode="resize")))
    assert np.abs(arr[2, 28] - (255, 0, 0)).max() <= 6  # squashed: no padding


def test_pad_colour_is_llavas_truncated_clip_mean():
    assert PAD_COLOR == (122, 116, 104)  # LLaVA: tuple(int(x * 255) for x in image_mean)


def test_exif_orientation_only_on_request():
    im = Image.new("RGB", (120, 60), (0, 0, 255))  # landscape; rotated 90 deg it is portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    arr = _decode(process_image(buf.getvalue(), replace(S, exif_transpose=True)))
    assert np.abs(arr[28, 2] - PAD_COLOR).max() <= 6  # padding left/right, not top/bottom
    assert np.abs(arr[2, 28] - (0, 0, 255)).max() <= 8
    arr = _decode(process_image(buf.getvalue(), S))  # LLaVA's PIL path ignores EXIF
    assert np.abs(arr[2, 28] - PAD_COLOR).max() <= 6 and np.abs(arr[28, 2] - (0, 0, 255)).max() <= 8


def test_16_bit_greyscale_is_rescaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    arr = _decode(process_image(buf.getvalue(), ImageSettings(size=56, mode="resize")))
    assert arr[:8].mean() < 40 and arr[-8:].mean() > 215  # full range kept, no saturation


@pytest.mark.parametrize("name", sorted(bad_images(64)))
def test_bad_images_are_rejected_with_their_reason(name):
    data, reason = bad_images(64)[name]
    with pytest.raises(ImageReject) as e:
        process_image(data, S)
    assert e.value.reason == reason


def test_pillow_bomb_warning_band_is_an_error():
    # Between 1x and 2x the limit Pillow only warns; it must still be rejected.
    data, _ = bad_images(64)["bomb"]
    with pytest.raises(ImageReject) as e:
        process_image(data, ImageSettings(size=56, max_pixels=1_000_000))
    assert e.value.reason == "image_too_large"


def test_a_huge_16_bit_png_costs_what_an_8_bit_one_does():
    """A 16-bit greyscale PNG of 4000x4000 (a few KB compressed, within the pixel bound) is
    rescaled a band of rows at a time: numpy never holds a float copy of the whole image
    (8 bytes a pixel, 24 at the peak), only 8-bit copies, less than the 4 bytes a pixel Pillow
    holds for any 8-bit RGB image of that size (traced allocations, not time)."""
    import tracemalloc

    side = 4000
    buf = io.BytesIO()
    Image.new("I;16", (side, side), 40000).save(buf, "PNG")
    data = buf.getvalue()
    assert len(data) < 1_000_000
    settings = ImageSettings(size=32, mode="resize", max_pixels=side * side)
    tracemalloc.start()
    try:
        jpg = process_image(data, settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * side * side, f"{peak / side / side:.1f} bytes per pixel"
    grey = np.asarray(Image.open(io.BytesIO(jpg)), dtype=np.int16)
    assert abs(grey.mean() - 40000 / 65535 * 255) < 2

"""What each vision-encoder kind means for the data and the model, in one table.

A kind fixes the pixel normalisation the encoder was trained with (preprocessing pads with the
mean colour, the loader normalises with mean/std, both recorded in the dataset manifest and
checked by the trainer), whether the encoder prepends a class token (CLIP does and its output
drops it; SigLIP has none), and whether the image may leave a strip narrower than a patch, which
the patch convolution drops (SigLIP so400m is published at 384 px with 14 px patches: a 27 x 27
grid). Data contract before model detail, so it lives in the bottom layer with the manifest
that records it; the model side of a kind is
``megatron_vwlmm/vision/towers.py``, its Hugging Face side ``megatron_vwlmm/vision/hf_formats.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionEncoderKind:
    name: str
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    class_token: bool
    partial_patches: bool = False

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The RGB fill LLaVA uses when padding an image to a square: the mean colour."""
        return tuple(int(c * 255) for c in self.image_mean)

    @property
    def num_class_tokens(self) -> int:
        """Tokens the encoder adds before the patches (dropped before the adapter)."""
        return 1 if self.class_token else 0

    def grid_error(self, image_size: int, patch_size: int) -> str | None:
        """Why ``image_size`` / ``patch_size`` is not a grid this kind can run, or None."""
        if patch_size <= 0 or image_size < patch_size:
            return f"image_size {image_size} must be at least patch_size {patch_size} (> 0)"
        if image_size % patch_size and not self.partial_patches:
            return f"{image_size} is not divisible by patch_size {patch_size}"
        return None


_KINDS = {
    # OpenAI CLIP (LLaVA-1.5's ViT-L/14-336).
    "clip": VisionEncoderKind(
        name="clip",
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        class_token=True,
    ),
    # Google SigLIP (transformers' SiglipImageProcessor defaults).
    "siglip": VisionEncoderKind(
        name="siglip", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), class_token=False,
        partial_patches=True,
    ),
}

ENCODER_KINDS = tuple(_KINDS)


def get_encoder_kind(name: str) -> VisionEncoderKind:
    if name not in _KINDS:
        raise ValueError(f"unknown vision encoder {name!r}; choose from {sorted(_KINDS)}")
    return _KINDS[name]

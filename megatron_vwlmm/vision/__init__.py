"""Vision encoders behind one seam: each kind (CLIP, SigLIP) is described once and looked up by
the name ``VisionConfig.kind`` holds, never assumed by the callers.

- ``encoders.py``: the data contract of a kind (pixel mean/std, pad colour, class token, patch
  grid rule); light (no torch, no megatron) so preprocessing can import it on Ray workers.
- ``towers.py``: the megatron encoder of a kind (builder, activation, the patch features the
  adapter reads).
- ``hf_formats.py``: its transformers config and weight names, and how LLaVA reads it.

Importing this package loads only ``encoders.py``; the other two are imported where needed.
"""

from megatron_vwlmm.vision.encoders import ENCODER_KINDS, VisionEncoderKind, get_encoder_kind

__all__ = ["ENCODER_KINDS", "VisionEncoderKind", "get_encoder_kind"]

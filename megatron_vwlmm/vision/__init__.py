"""Vision encoders behind one seam: each kind (CLIP, SigLIP) is described once and looked up by
the name ``VisionConfig.kind`` holds, never assumed by the callers.

- ``vwlmm_data/encoders.py``: the data contract of a kind (pixel mean/std, pad colour, class
  token, patch grid rule); it sits in the bottom layer because preprocessing, the dataset
  manifest and the loader read it as much as the model does.
- ``towers.py``: the megatron encoder of a kind (builder, activation, the patch features the
  adapter reads).
- ``hf_formats.py``: its transformers config and weight names, and how LLaVA reads it.

Importing this package loads nothing; each module is imported where needed.
"""

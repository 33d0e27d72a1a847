"""The one home of vwlmm's checkpoint contract, shared by the converter and the trainer.

``layout``: the folder (``latest``, ``iter_NNNNNNN``, the marker, the vision tail), its
crash-safe commit and pruning. ``metadata``: the model config and weight provenance each
checkpoint records in its common state. megatron's ``dist_checkpointing`` writes the tensors;
``convert/megatron_io.py`` and ``pipeline/checkpoint.py`` drive it.
"""

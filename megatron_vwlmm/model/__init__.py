"""The VW-LMM model on megatron-core: config, layer specs, splicing, model, schedule glue.

The names below load on first use (PEP 562), so that reading a model config
(``megatron_vwlmm.model.config``, torch-free) does not import torch and megatron-core: the
trainer's ``--help`` and its config errors answer in a fraction of a second.
"""

import importlib

_EXPORTS = {
    "VWLMMBatch": "batch", "collate_samples": "batch", "collate_packed": "batch",
    "IGNORE_INDEX": "config", "IMAGE_TOKEN_ID": "config", "DecoderConfig": "config",
    "VisionConfig": "config", "VWLMMConfig": "config", "get_preset": "config",
    "replace": "config", "PackedSequence": "packing", "VWLMMModel": "vwlmm_model",
    "build_model": "vwlmm_model",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

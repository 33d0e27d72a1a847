"""The VW-LMM model on megatron-core: config, layer specs, splicing, model, schedule glue."""

from megatron_vwlmm.model.batch import VWLMMBatch, collate_packed, collate_samples
from megatron_vwlmm.model.config import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    DecoderConfig,
    VisionConfig,
    VWLMMConfig,
    get_preset,
    replace,
)
from megatron_vwlmm.model.packing import PackedSequence
from megatron_vwlmm.model.vwlmm_model import VWLMMModel, build_model

__all__ = [
    "VWLMMBatch", "collate_samples", "collate_packed", "PackedSequence", "IGNORE_INDEX", "IMAGE_TOKEN_ID", "DecoderConfig",
    "VisionConfig", "VWLMMConfig", "get_preset", "replace", "VWLMMModel", "build_model",
]

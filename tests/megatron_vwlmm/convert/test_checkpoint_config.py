"""The model config an export rebuilds from a checkpoint's common state (import or trainer)."""

from __future__ import annotations

import pytest

from megatron_vwlmm.convert.megatron_io import (
    config_from_dict,
    config_to_dict,
    trainer_model_config,
)
from megatron_vwlmm.model import get_preset


def test_vwlmm_config_round_trip():
    config = get_preset("mistral-7b", pif=True, lambda_vm=0.5, **{"decoder.seq_length": 1024})
    assert config_from_dict(config_to_dict(config)) == config


def test_unknown_field_is_named():
    raw = config_to_dict(get_preset("tiny"))
    raw["decoder"]["num_heads"] = 4
    with pytest.raises(ValueError, match="ckpt/common.pt: not a VWLMMConfig.*num_heads"):
        config_from_dict(raw, "ckpt/common.pt")


def test_trainer_run_config_rebuilds_the_trained_model():
    # pipeline.config.TrainConfig.to_dict() as pipeline/checkpoint.py stores it under "config".
    run = {"model": {"preset": "tiny", "vision": None, "init_from": None,
                     "overrides": {"decoder.vocab_size": 256, "lambda_vm": 0.3}},
           "precision": {"bf16": False, "fp8": None}}
    expected = get_preset("tiny", **{"decoder.vocab_size": 256, "lambda_vm": 0.3})
    assert trainer_model_config(run) == expected

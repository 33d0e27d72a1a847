"""What a checkpoint's common state records about its model: the ``VWLMMConfig`` and the
provenance of its weights (``megatron_vwlmm/checkpoint/metadata.py``)."""

from __future__ import annotations

import pytest

from megatron_vwlmm.checkpoint.metadata import (
    Provenance,
    config_from_dict,
    config_to_dict,
    model_config_of,
)
from megatron_vwlmm.model import get_preset


def test_vwlmm_config_round_trip():
    config = get_preset("mistral-7b", pif=True, lambda_vm=0.5, **{"decoder.seq_length": 1024})
    assert config_from_dict(config_to_dict(config)) == config


def test_unknown_or_invalid_field_is_named():
    raw = config_to_dict(get_preset("tiny"))
    raw["decoder"]["num_heads"] = 4
    with pytest.raises(ValueError, match="ckpt/common.pt: not a VWLMMConfig.*num_heads"):
        config_from_dict(raw, "ckpt/common.pt")
    raw = config_to_dict(get_preset("tiny"))
    raw["decoder"]["num_layers"] = 0
    with pytest.raises(ValueError, match="ckpt/common.pt: .*decoder.num_layers: must be positive"):
        config_from_dict(raw, "ckpt/common.pt")


def test_common_state_without_model_config_is_refused():
    with pytest.raises(ValueError, match="records no model config"):
        model_config_of({"config": {"model": {"preset": "tiny"}}}, "x/common.pt")


def test_provenance_round_trip_and_scratch(tmp_path):
    prov = Provenance(import_dir="/ck/init", conversion={"architecture": "llama"},
                      tokenizer="/hf/llm", vision_tail="/ck/init/vision_tail.safetensors")
    assert Provenance.of({"provenance": prov.to_dict()}, "x") == prov
    assert Provenance.of({}, "x") == Provenance()  # trained from scratch
    assert Provenance().vision_tail_file(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="vision tail.*neither in the checkpoint"):
        prov.vision_tail_file(tmp_path)  # recorded, but neither copy exists
    with pytest.raises(ValueError, match="not a Provenance"):
        Provenance.of({"provenance": {"import_folder": "/x"}}, "x")

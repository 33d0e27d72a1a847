"""The load-time fingerprint catches a checkpoint whose stored tensor was zeroed after the save
(what a resharding bug that zero-fills a parameter leaves), and names that tensor; an intact
checkpoint loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megatron_vwlmm.parallel.launch import run_on_ranks


def _save_zero_and_load(root: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_vwlmm.checkpoint import fingerprint
    from megatron_vwlmm.checkpoint.layout import FINGERPRINT_FILE
    from megatron_vwlmm.convert.errors import IncompleteCheckpointError
    from megatron_vwlmm.convert.megatron_io import (full_model, load_checkpoint,
                                                    resolve_checkpoint, save_checkpoint)
    from megatron_vwlmm.model import get_preset

    config = get_preset("tiny")
    good = save_checkpoint(full_model(config), config, Path(root) / "good",
                           layout={"tp": 1, "pp": 1}, source={})
    load_checkpoint(resolve_checkpoint(good))  # an intact checkpoint loads

    # The same checkpoint with one tensor zeroed in storage, the saved fingerprint kept.
    model = full_model(config)
    model.load_state_dict(load_checkpoint(resolve_checkpoint(good)).state_dict())
    name = "language_model.decoder.layers.1.mlp.linear_fc2.weight"
    with torch.no_grad():
        dict(model.named_parameters())[name].zero_()
    damaged = Path(root) / "damaged"  # the zeroed tensors, the good checkpoint's records
    damaged.mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(damaged),
                            sharded_strategy=("torch_dist", 1))
    for record in ("common.pt", FINGERPRINT_FILE):
        shutil.copyfile(good / record, damaged / record)
    try:
        load_checkpoint(resolve_checkpoint(damaged))
    except IncompleteCheckpointError as exc:
        return {"error": str(exc), "is_mismatch": "differ from what was saved" in str(exc),
                "rtol": fingerprint.RTOL}
    return {"error": None}


@pytest.mark.timeout(600)
def test_a_zeroed_tensor_is_caught_and_named(tmp_path):
    (result,) = run_on_ranks(_save_zero_and_load, 1, args=(str(tmp_path),))
    assert result["error"] is not None, "the zeroed tensor was loaded without complaint"
    assert result["is_mismatch"], result["error"]
    assert "1 tensor(s)" in result["error"]
    assert "language_model.decoder.layers.mlp.linear_fc2.weight[1]" in result["error"]

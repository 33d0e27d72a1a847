"""A tiny SigLIP VW-LMM (``model.vision_preset=tiny-siglip``) trains in the real trainer on a
dataset prepared for SigLIP; the trainer refuses the same model on a dataset prepared for CLIP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.data.synthetic import make_samples, write_dataset
from tests.pipeline.launch import REPO, checkpoint_tensors, losses, train

pytestmark = pytest.mark.timeout(600)

SIGLIP = ["model.vision_preset=tiny-siglip"]


def _dataset(root: Path, encoder: str) -> Path:
    write_dataset(str(root), make_samples(16, seed=5), shard_size=8, formats=("arrow",),
                  vision_encoder=encoder)
    return root


def test_tiny_siglip_trains(tmp_path):
    data = _dataset(tmp_path / "data", "siglip")
    run = tmp_path / "run"
    train(1, data, run, SIGLIP + ["parallel.tp=1", "train.train_iters=4",
                                  "data.global_batch_size=4", "data.micro_batch_size=2",
                                  "checkpoint.save_interval=4"])
    records = losses(run)
    assert sorted(records) == [1, 2, 3, 4]
    for record in records.values():
        assert math.isfinite(record["total_loss"]) and record["vm_loss"] > 0
    assert records[4]["lm_loss"] < records[1]["lm_loss"]
    # The checkpoint holds a SigLIP tower: a patch-convolution bias, no class token, no
    # pre-LayerNorm.
    vision = {k for k in checkpoint_tensors(run / "checkpoints" / "iter_0000004")
              if ".vision_model." in k or k.startswith("vision_model.")}
    assert any(k.endswith("vision_model.conv1.bias") for k in vision)
    assert not any(k.endswith(("class_token", "ln_pre.weight")) for k in vision)


def test_trainer_refuses_a_dataset_prepared_for_another_encoder(tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.train import run

    data = _dataset(tmp_path / "data", "clip")
    cfg = load_config(str(REPO / "configs/tiny-cpu.yaml"), SIGLIP + [
        "parallel.tp=1", f"data.path={data}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"model vision.kind='siglip': .* prepared for 'clip' "
                                          r".*--vision-encoder siglip"):
        run(cfg)
    assert not (tmp_path / "run").exists()  # refused before writing anything

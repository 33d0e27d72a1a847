"""Config system: presets, --set overrides, and one clear message per class of config error."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.validate import check_fp8_available, check_layout, check_manifest, check_model
from pipeline.data.synthetic import make_samples, write_dataset
from vwlmm_data.contract import Manifest

REPO = Path(__file__).resolve().parents[2]
PRESETS = ["tiny-cpu", "stage1-vicuna-7b", "stage1-mistral-7b", "stage2-vicuna-7b",
           "stage2-mistral-7b"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_build_a_valid_model_config(name):
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
    model_cfg = cfg.model.vwlmm()
    check_model(model_cfg, cfg)
    if name.startswith("stage1"):  # LLaVA stage 1: adapter + VM head only
        assert model_cfg.freeze_decoder and model_cfg.freeze_vision
        assert not model_cfg.freeze_adapter and not model_cfg.freeze_vm_head
    if name.startswith("stage2"):
        assert not model_cfg.freeze_decoder and model_cfg.freeze_vision


def test_set_overrides_are_typed_and_reach_the_model():
    cfg = load_config(str(REPO / "configs/tiny-cpu.yaml"),
                      ["optim.lr=2e-4", "optim.min_lr=0", "parallel.tp=1", "model.decoder.num_layers=2",
                       "precision.fp8=null", "data.valid_fraction=0"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.parallel.tp == 1
    assert cfg.model.vwlmm().decoder.num_layers == 2


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("parallel.tp=two", "parallel.tp='two': expected an integer"),
    ("parallel.tp=0", "parallel.tp=0: must be >= 1"),
    ("optim.decay_style=step", "optim.decay_style='step': must be one of"),
    ("parallel.vpp=2", "parallel.vpp=2: interleaved pipelining needs"),
    ("optim.loss_normalization=mean", "optim.loss_normalization='mean': must be one of"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(str(REPO / "configs/tiny-cpu.yaml"), ["parallel.tp=1", override])


def _tiny(*sets):
    cfg = load_config(str(REPO / "configs/tiny-cpu.yaml"), list(sets))
    return cfg, cfg.model.vwlmm()


def test_tp_not_dividing_heads():
    cfg, m = _tiny("parallel.tp=3")
    with pytest.raises(ConfigError, match="num_attention_heads: 4 heads are not divisible by "
                                          "tensor_parallel=3"):
        check_model(m, cfg)


def test_tp_not_dividing_vocab():
    cfg, m = _tiny("parallel.tp=2", "model.decoder.vocab_size=32001")
    with pytest.raises(ConfigError, match="vocab_size: vocab 32001 is not divisible by "
                                          "tensor_parallel=2"):
        check_model(m, cfg)


def test_pp_larger_than_layers():
    cfg, m = _tiny("parallel.tp=1", "parallel.pp=8")
    with pytest.raises(ConfigError, match="num_layers: 4 layers cannot fill 8 pipeline stages"):
        check_model(m, cfg)


def test_sequence_parallel_needs_tp_and_a_divisible_sequence():
    cfg, m = _tiny("parallel.tp=1", "parallel.sequence_parallel=true")
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=true: splits the sequence "
                                          r"over the tensor-parallel ranks, so it needs "
                                          r"parallel.tp >= 2 \(got 1\)"):
        check_model(m, cfg)
    cfg, m = _tiny("parallel.tp=2", "parallel.sequence_parallel=true",
                   "model.decoder.seq_length=1025")
    with pytest.raises(ConfigError, match="model.decoder.seq_length=1025 is not divisible by "
                                          "parallel.tp=2"):
        check_model(m, cfg)
    cfg, m = _tiny("parallel.tp=2", "parallel.sequence_parallel=true")
    check_model(m, cfg)


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    cfg, _ = _tiny("parallel.tp=1", "data.micro_batch_size=4", "data.global_batch_size=12")
    assert check_layout(cfg, world_size=1) == 1  # 12 = 3 x 4 x 1: fine
    with pytest.raises(ConfigError, match=r"data.global_batch_size=12: must be divisible by "
                                          r"data.micro_batch_size x DP = 4 x 2 = 8"):
        check_layout(cfg, world_size=2)


def test_packing_counts_samples_per_step_and_needs_packed_attention():
    cfg, m = _tiny("parallel.tp=1", "data.packing=true", "data.micro_batch_size=4",
                   "data.global_batch_size=6")
    # Packed, micro-batches are rows: only the step's samples must split over DP.
    assert check_layout(cfg, world_size=2) == 2
    with pytest.raises(ConfigError, match=r"data.global_batch_size=6: must be divisible by "
                                          r"DP = 4 \(data.packing=true"):
        check_layout(cfg, world_size=4)
    check_model(m, cfg)
    cfg, m = _tiny("parallel.tp=1", "data.packing=true",
                   "model.attention_backend=unfused")
    with pytest.raises(ConfigError, match="data.packing=true: needs attention that keeps packed "
                                          "samples apart"):
        check_model(m, cfg)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                    reason="Transformer Engine installed: FP8 is available")
def test_fp8_without_transformer_engine():
    cfg, _ = _tiny("precision.bf16=true", "precision.fp8=hybrid")
    with pytest.raises(ConfigError, match="FP8 needs Transformer Engine, which is not installed"):
        check_fp8_available(cfg)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    write_dataset(str(root), make_samples(2), 2, formats=("arrow",), tokenizer="mistral-7b",
                  template="plain")
    return json.loads((root / "manifest.json").read_text())


@pytest.mark.parametrize("sets, mutate, message", [
    (["data.tokenizer=vicuna"], None,
     "data.tokenizer='vicuna': .* was tokenized with 'mistral-7b'"),
    (["data.template=llava_v1"], None, "data.template='llava_v1': .* uses template 'plain'"),
    ([], {"image_size": 336}, "vision.image_size=32: .* has images of size 336"),
    ([], {"num_patches_per_image": 576}, "num_patches=16: .* counted 576 patches"),
])
def test_manifest_disagreeing_with_config(manifest, sets, mutate, message):
    cfg, m = _tiny("parallel.tp=1", *sets)
    data = copy.deepcopy(manifest)
    data.update(mutate or {})
    with pytest.raises(ConfigError, match=message):
        check_manifest(Manifest.from_dict(data), m, cfg)
    check_manifest(Manifest.from_dict(manifest), m, load_config(str(REPO / "configs/tiny-cpu.yaml"),
                                            ["data.tokenizer=mistral-7b", "data.template=plain"]))


def test_cli_reports_config_errors_and_documents_every_key(tmp_path):
    """The real entry point: exit code 2 with the message; --help lists each --set key."""
    env_cmd = [sys.executable, "-m", "pipeline.train", "--config", "configs/tiny-cpu.yaml"]
    bad = subprocess.run(env_cmd + ["--set", "parallel.tp=3", "--set", f"run_dir={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"WORLD_SIZE": "3", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "config error: model" in bad.stderr and "tensor_parallel=3" in bad.stderr
    help_text = subprocess.run(env_cmd[:3] + ["--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120).stdout
    for key in ("optim.adapter_lr", "checkpoint.keep_last", "parallel.vpp", "data.format",
                "model.decoder.num_layers", "model.vision.image_size", "model.lambda_vm"):
        assert key in help_text


def _save_tiny_imports(root: str) -> None:
    """Two TP1PP1 checkpoints as `vwlmm-convert import` writes them: the tiny-cpu model shape,
    and the same with a doubled hidden size (one process launch for both)."""
    from megatron_vwlmm.convert.megatron_io import save_checkpoint
    from megatron_vwlmm.model import build_model
    from megatron_vwlmm.model.config import replace

    _, model_cfg = _tiny()
    wider = replace(model_cfg, **{"decoder.hidden_size": 2 * model_cfg.decoder.hidden_size})
    for name, config in (("same", model_cfg), ("other", wider)):
        save_checkpoint(build_model(config), config, f"{root}/{name}",
                        layout={"tp": 1, "pp": 1}, source={"test": True})


def test_init_from_must_hold_a_model_of_the_run_shape(tmp_path):
    from megatron_vwlmm.parallel.launch import run_on_ranks
    from pipeline.validate import check_init_from

    run_on_ranks(_save_tiny_imports, 1, args=(str(tmp_path),))
    cfg, model_cfg = _tiny(f"model.init_from={tmp_path / 'same'}")
    check_init_from(model_cfg, cfg)  # same shapes: accepted
    cfg, model_cfg = _tiny(f"model.init_from={tmp_path / 'other'}")
    with pytest.raises(ConfigError, match=r"decoder.hidden_size: run 64 vs checkpoint 128"):
        check_init_from(model_cfg, cfg)
    cfg, model_cfg = _tiny(f"model.init_from={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="checkpoint directory does not exist"):
        check_init_from(model_cfg, cfg)

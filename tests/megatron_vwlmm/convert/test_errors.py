"""Clear errors before any work is done: unknown architecture, vocab/tokenizer mismatch, TP not
dividing heads, incomplete checkpoint directories."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_vwlmm.convert.errors import (
    IncompleteCheckpointError,
    UnsupportedModelError,
    VocabMismatchError,
)
from tests.megatron_vwlmm.convert import fixtures as fx


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    fx.make_llm_dir(root / "llama", "llama")
    fx.make_clip_dir(root / "clip")
    return root


def test_unknown_architecture(sources, tmp_path):
    from transformers import GPT2Config

    from megatron_vwlmm.convert.importer import import_hf

    GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'.*not supported"):
        import_hf(str(tmp_path / "gpt2"), str(sources / "clip"), str(tmp_path / "out"))
    with pytest.raises(UnsupportedModelError, match="not a CLIP vision model"):
        import_hf(str(sources / "llama"), str(sources / "llama"), str(tmp_path / "out"))


def test_rope_scaling_refused(sources, tmp_path):
    from transformers import LlamaConfig

    from megatron_vwlmm.convert.hf_configs import decoder_architecture

    config = LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="rope_type 'linear'"):
        decoder_architecture(config)


def test_tokenizer_larger_than_vocab(sources, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from megatron_vwlmm.convert.importer import import_hf
    from megatron_vwlmm.convert.processor import load_tokenizer_with_image_token

    shutil.copytree(sources / "llama", tmp_path / "llm")
    tok = AutoTokenizer.from_pretrained(tmp_path / "llm")
    tok.add_tokens(["extra1", "extra2"])
    tok.save_pretrained(tmp_path / "llm")
    with pytest.raises(VocabMismatchError, match="258 tokens but the model's vocab_size is 256"):
        import_hf(str(tmp_path / "llm"), str(sources / "clip"), str(tmp_path / "out"))
    with pytest.raises(VocabMismatchError, match="258 tokens but the checkpoint's vocab_size"):
        load_tokenizer_with_image_token(tmp_path / "llm", 256)


def test_tp_not_dividing_heads(sources, tmp_path):
    from megatron_vwlmm.convert.importer import import_hf

    with pytest.raises(ValueError, match="decoder.num_attention_heads: 4 heads are not "
                                         "divisible by tensor_parallel=3"):
        import_hf(str(sources / "llama"), str(sources / "clip"), str(tmp_path / "out"), tp=3)


def test_incomplete_checkpoint_dirs(tmp_path):
    from megatron_vwlmm.convert.megatron_io import resolve_checkpoint

    with pytest.raises(IncompleteCheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IncompleteCheckpointError, match="not a complete megatron dist checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(IncompleteCheckpointError, match="missing.*common.pt"):
        resolve_checkpoint(tmp_path / "partial")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "latest").write_text("iter_0000003\n")
    with pytest.raises(IncompleteCheckpointError, match="names 'iter_0000003', which does not exist"):
        resolve_checkpoint(tmp_path / "root")


def test_cli_reports_errors_and_has_help(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "megatron_vwlmm.convert.cli", "export",
                           "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a complete megatron dist checkpoint" in proc.stderr
    assert not (tmp_path / "o").exists()
    helped = subprocess.run([sys.executable, "-m", "megatron_vwlmm.convert.cli", "import", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "--vm-head-init" in helped.stdout


class _RunsCode:
    """Unpickling this calls ``open(path, "w")``: a stand-in for a pickle that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_only_weight_files_are_read_and_never_unpickled_freely(sources, tmp_path):
    """A folder saved by transformers' Trainer holds other pickles beside the `.bin` weights
    (training_args.bin, optimizer.bin): only the weights are read, with `weights_only`."""
    import argparse
    import shutil

    import torch

    from megatron_vwlmm.convert.hf_io import read_hf_tensors, read_tensor_file

    state = dict(read_hf_tensors(sources / "llama"))
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    for folder in (single, sharded):
        shutil.copytree(sources / "llama", folder, ignore=shutil.ignore_patterns("*.safetensors"))
        torch.save(argparse.Namespace(learning_rate=2e-5), folder / "training_args.bin")
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.bin")
    torch.save(state, single / "pytorch_model.bin")
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:3],
              "pytorch_model-00002-of-00002.bin": keys[3:]}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, sharded / name)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, names in shards.items() for k in names}}))
    for folder in (single, sharded):
        got = read_hf_tensors(folder)
        assert set(got) == set(state), folder
        assert all(torch.equal(got[k], state[k]) for k in state)

    evil = tmp_path / "evil.bin"
    torch.save({"w": _RunsCode(tmp_path / "pwned")}, evil)
    with pytest.raises(IncompleteCheckpointError, match="not a readable torch weights file"):
        read_tensor_file(evil)
    assert not (tmp_path / "pwned").exists()
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(IncompleteCheckpointError, match="no name -> tensor mapping"):
        read_tensor_file(tmp_path / "list.bin")


def test_a_safetensors_index_pointing_outside_its_folder_is_refused(tmp_path):
    """An imported folder's index may name only shard files inside that folder: `../x`, an
    absolute path and a symlink leading out are refused, though the files exist."""
    import torch
    from safetensors.torch import save_file

    from megatron_vwlmm.convert.hf_io import SAFETENSORS_INDEX, read_hf_tensors

    outside = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"v": torch.ones(2)}, str(hf / "model-00001-of-00002.safetensors"))
    (hf / "model-00002-of-00002.safetensors").symlink_to(outside)
    for name in ("../elsewhere.safetensors", str(outside), "model-00002-of-00002.safetensors"):
        (hf / SAFETENSORS_INDEX).write_text(json.dumps(
            {"weight_map": {"v": "model-00001-of-00002.safetensors", "w": name}}))
        with pytest.raises(IncompleteCheckpointError, match="outside"):
            read_hf_tensors(hf)
    (hf / SAFETENSORS_INDEX).write_text(json.dumps(
        {"weight_map": {"v": "model-00001-of-00002.safetensors"}}))
    assert torch.equal(read_hf_tensors(hf)["v"], torch.ones(2))

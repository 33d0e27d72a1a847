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
    with pytest.raises(IncompleteCheckpointError, match="names 'iter_0000003', which is missing"):
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

"""Config validation names the field; the manifest loader; the CLI's help and tokenizer helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing.cli import config_from_args
from preprocessing.config import PreprocessConfig
from vwlmm_data.contract import IGNORE_INDEX, IMAGE_TOKEN_ID, VisionInfo, load_manifest
from preprocessing.tokenizer import load_tokenizer, tokenizer_identity

BASE = dict(source="llava", inputs=["x.json"], image_root="img", tokenizer="t", output="o")


@pytest.mark.parametrize("field,value,needle", [
    ("template", "chatml", "template"), ("image_size", 300, "image_size"),
    ("format", "tfrecord", "format"), ("max_seq_len", 500, "max_seq_len"),
    ("jpeg_quality", 0, "jpeg_quality"), ("image_root", None, "image_root"),
    ("source", "coco", "source"), ("samples_per_shard", 0, "samples_per_shard"),
])
def test_invalid_config_names_the_field(field, value, needle):
    with pytest.raises(ValueError, match=f"config field '{needle}'"):
        PreprocessConfig(**{**BASE, field: value})


def test_alias_and_runtime_fields_do_not_change_the_fingerprint():
    a = PreprocessConfig(**{**BASE, "source": "sharegpt4v"})
    b = PreprocessConfig(**{**BASE, "output": "elsewhere"}, num_workers=7, ray_address="x:1")
    assert a.source == "llava" and a.fingerprint() == b.fingerprint()
    assert a.num_patches == 576
    assert a.fingerprint() != PreprocessConfig(**BASE, template="mistral").fingerprint()


def test_llava_stage_defaults_and_named_deviations(tmp_path):
    plain, chat = PreprocessConfig(**BASE), PreprocessConfig(**{**BASE, "template": "vicuna_v1"})
    assert (plain.image_mode, chat.image_mode) == ("crop", "pad")  # LLaVA-1.5 square / pad
    assert (plain.plain_eos, plain.exif_transpose, plain.jpeg_draft) == (False, False, False)
    assert plain.tokenizer_backend == "fast"  # the folder "t" holds no tokenizer.model
    assert plain.content_dict()["image_mode"] == "crop"  # recorded resolved in the manifest
    with pytest.raises(ValueError, match="config field 'plain_eos'"):
        PreprocessConfig(**{**BASE, "template": "mistral", "plain_eos": True})
    with pytest.raises(ValueError, match="config field 'tokenizer_backend'.*no tokenizer.model"):
        PreprocessConfig(**{**BASE, "tokenizer": str(tmp_path), "tokenizer_backend": "sentencepiece"})
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert PreprocessConfig(**{**BASE, "tokenizer": str(tmp_path)}).tokenizer_backend == "sentencepiece"


def test_cli_args_map_to_config():
    cfg = config_from_args(["--source", "laion", "--input", "a.tar", "a.parquet", "--tokenizer",
                            "t", "--output", "o", "--format", "both", "--no-dedup",
                            "--max-punsafe", "0.5", "--num-workers", "2"])
    assert (cfg.inputs, cfg.formats, cfg.dedup, cfg.source_options.max_punsafe) == (
        [os.path.abspath("a.tar"), os.path.abspath("a.parquet")], ("webdataset", "arrow"), False, 0.5)
    assert cfg.content_dict()["max_punsafe"] == 0.5  # the manifest records a source's options
    s3 = config_from_args(["--source", "llava", "--input", "s3://b/x.json", "--image-root",
                           "s3://b/img", "--tokenizer", "t", "--output", "s3://b/out"])
    assert (s3.inputs, s3.image_root, s3.output) == (["s3://b/x.json"], "s3://b/img", "s3://b/out")
    assert "max_punsafe" not in s3.content_dict()
    with pytest.raises(ValueError, match=r"--source llava has no option --max-punsafe "
                                         r"\(--source laion\)"):
        config_from_args(["--source", "llava", "--input", "x.json", "--image-root", "i",
                          "--tokenizer", "t", "--output", "o", "--max-punsafe", "0.5"])


def test_help_documents_every_option():
    res = subprocess.run([str(Path(sys.executable).parent / "vwlmm-preprocess"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for opt in ("--source", "--input", "--image-root", "--tokenizer", "--template", "--output",
                "--format", "--image-size", "--image-mode", "--max-seq-len", "--samples-per-shard",
                "--plain-eos", "--exif-transpose", "--jpeg-draft", "--tokenizer-backend", "--overlong",
                "--s3-endpoint", "build-tokenizer", "ray job submit", "options of --source laion",
                "--max-punsafe", "--min-caption-chars"):
        assert opt in res.stdout


def test_constants_and_manifest_loader(tmp_path):
    assert (IMAGE_TOKEN_ID, IGNORE_INDEX) == (-200, -100)
    clip = VisionInfo.of("clip")
    assert clip.image_mean[0] == 0.48145466 and clip.image_std[2] == 0.27577711
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="missing field"):
        load_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is preprocessing finished"):
        load_manifest(str(tmp_path / "nope"))


def test_converted_tokenizer_matches_sentencepiece(tokenizer_dir):
    import sentencepiece as spm

    from preprocessing.tokenizer import mistral_sentencepiece_path

    sp = spm.SentencePieceProcessor(model_file=str(mistral_sentencepiece_path()))
    tok = load_tokenizer(tokenizer_dir)
    text = "A tabby cat, 3 kittens\nand naïve émigrés — 東京 🙂."
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (sp.bos_id(), sp.eos_id(), 32000)
    info = tokenizer_identity(tokenizer_dir)
    assert len(info.sha256) == 64 and info.vocab_size == 32000

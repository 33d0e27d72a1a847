"""The source seam: the CLI's choices and each source's own flags come from the registry, and a
third source with an option of its own plugs in without touching the driver, the worker, the
encoder, the config or the CLI: in-process, and through the installed ``vwlmm-preprocess`` with
only a new file and the registry's lines added to a copy of the package."""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preprocessing import sources
from preprocessing.cli import build_parser
from preprocessing.config import PreprocessConfig
from preprocessing.tokenizer import load_tokenizer
from tests.preprocessing import toy_source
from tests.preprocessing.inline_job import jpeg, run_inline
from tests.preprocessing.pp_checks import read_webdataset
from tests.preprocessing.toy_source import CaptionLines
from vwlmm_data.contract import IMAGE_TOKEN_ID, load_manifest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENTRIES = [("a", "red", "A red square."), ("b", "blue", "A blue square."),
           ("c", "red", "A red square."),  # the same image and text as "a"
           ("d", "blue", "Buy SPAM now."), ("a", "blue", "Another a.")]  # "a" again: renamed


def test_cli_source_choices_and_help_come_from_the_registry():
    action = next(a for a in build_parser()._actions if a.dest == "source")
    assert tuple(action.choices) == sources.source_choices() == ("laion", "llava", "sharegpt4v")
    for s in sources.SOURCES.values():
        assert s.help in action.help
    assert sources.get_source("sharegpt4v") is sources.get_source("llava")
    with pytest.raises(ValueError, match="unknown source 'coco'"):
        sources.get_source("coco")


def _toy_inputs(root: Path) -> tuple[Path, Path]:
    """(the JSON lines file, the image folder) of ``ENTRIES``."""
    images = root / "img"
    images.mkdir()
    for name, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (images / f"{name}.jpg").write_bytes(jpeg(colour))
    (root / "in.jsonl").write_text("".join(
        json.dumps({"id": i, "image": f"{img}.jpg", "caption": c}) + "\n" for i, img, c in ENTRIES))
    return root / "in.jsonl", images


def _check_toy_output(out: Path, tokenizer_dir: str) -> None:
    manifest = load_manifest(str(out))
    assert (manifest.num_samples, manifest.rejected) == (3, {"banned_word": 1, "duplicate": 1})
    assert manifest.config["banned_word"] == "SPAM"  # the source's option, in the manifest
    # units of records (a, b), (c, d), (a): the second is all rejected and leaves no shard
    assert [s.path for s in manifest.shards] == ["shard-000000.tar", "shard-000002.tar"]
    rejects = [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]
    assert {(r["key"], r["reason"]) for r in rejects} == {("captions-c", "duplicate"),
                                                           ("captions-d", "banned_word")}
    samples = read_webdataset([str(out / s.path) for s in manifest.shards])
    assert [s["key"] for s in samples] == ["captions-a", "captions-b", "captions-a_1"]
    tok = load_tokenizer(tokenizer_dir)
    first = samples[0]
    text = tok.decode([t for t in first["input_ids"] if t >= 0], skip_special_tokens=True)
    assert text.strip() == "A red square." and first["num_images"] == 1
    assert np.count_nonzero(first["input_ids"] == IMAGE_TOKEN_ID) == 1


def test_a_third_source_runs_through_the_unchanged_driver(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(sources, "SOURCES", dict(sources.SOURCES))
    monkeypatch.setattr(sources, "_ALIASES", dict(sources._ALIASES))
    sources.register(CaptionLines())
    data, images = _toy_inputs(tmp_path)
    cfg = PreprocessConfig(source="caps", inputs=[str(data)], image_root=str(images),
                           tokenizer=tokenizer_dir, output=str(tmp_path / "out"), image_size=28,
                           patch_size=14, samples_per_shard=2, max_seq_len=64, progress=False,
                           source_options={"banned_word": "SPAM"})
    assert cfg.source == "captions" and cfg.image_mode == "crop"
    with pytest.raises(ValueError, match="--source captions needs --image-root"):
        PreprocessConfig(source="captions", inputs=["x"], tokenizer=tokenizer_dir, output="o")
    with pytest.raises(ValueError, match=r"--source captions has no option --max-punsafe "
                                         r"\(--source laion\)"):
        PreprocessConfig(source="captions", inputs=["x"], image_root="i", tokenizer=tokenizer_dir,
                         output="o", source_options={"max_punsafe": 0.5})
    run_inline(monkeypatch, cfg)
    _check_toy_output(tmp_path / "out", tokenizer_dir)


def _package_with_toy_source(root: Path) -> Path:
    """A copy of the ``preprocessing`` package under ``root`` with the toy source added the way
    a new source is: its module, and its import and ``register`` lines in the registry."""
    package = root / "preprocessing"
    shutil.copytree(REPO / "preprocessing", package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "sources" / "captions.py").write_text(Path(toy_source.__file__).read_text())
    registry = package / "sources" / "__init__.py"
    text = registry.read_text()
    for anchor, line in (("from preprocessing.sources.llava import LlavaSource\n",
                          "from preprocessing.sources.captions import CaptionLines\n"),
                         ("register(LlavaSource())\n", "register(CaptionLines())\n")):
        assert text.count(anchor) == 1
        text = text.replace(anchor, anchor + line)
    registry.write_text(text)
    return root


def _changed_files(work: Path) -> dict[str, list[str]]:
    """Every file of the copy that differs from the repository's: its added and removed lines."""
    changed = {}
    for path in sorted(work.rglob("*.py")):
        rel = path.relative_to(work)
        original = REPO / rel
        before = original.read_text().splitlines() if original.exists() else []
        diff = [l for l in difflib.ndiff(before, path.read_text().splitlines())
                if l.startswith(("+ ", "- "))]
        if diff:
            changed[str(rel)] = diff
    return changed


def test_a_third_source_with_its_own_option_through_the_installed_command(
        ray_head, tokenizer_dir, tmp_path):
    work = _package_with_toy_source(tmp_path / "job")
    changed = _changed_files(work)
    assert sorted(changed) == ["preprocessing/sources/__init__.py",
                               "preprocessing/sources/captions.py"]
    assert changed["preprocessing/sources/__init__.py"] == [
        "+ from preprocessing.sources.captions import CaptionLines", "+ register(CaptionLines())"]

    help_text = subprocess.run([str(BIN / "vwlmm-preprocess"), "--help"], capture_output=True,
                               text=True, timeout=60,
                               env={**ray_head["env"], "PYTHONPATH": str(work)})
    assert help_text.returncode == 0, help_text.stderr
    words = " ".join(help_text.stdout.split())  # argparse wraps lines
    assert "captions (alias caps): JSON lines of id, image, caption" in words
    assert "options of --source captions: --banned-word BANNED_WORD reject captions holding " \
           "this word (default off)" in words and "--max-punsafe" in words

    data, images = _toy_inputs(tmp_path)
    out = tmp_path / "out"
    # Ray ships the job's working folder to the driver and every worker, ahead of the repository.
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"],
           "--working-dir", str(work), "--", "vwlmm-preprocess", "--source", "captions",
           "--input", str(data), "--image-root", str(images), "--tokenizer", tokenizer_dir,
           "--output", str(out), "--image-size", "28", "--patch-size", "14",
           "--samples-per-shard", "2", "--max-seq-len", "64", "--banned-word", "SPAM",
           "--no-progress"]
    res = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "succeeded" in res.stdout, \
        res.stdout[-4000:] + res.stderr[-4000:]
    _check_toy_output(out, tokenizer_dir)

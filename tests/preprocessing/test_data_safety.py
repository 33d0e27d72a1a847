"""What preprocessing may delete and how it writes: ``--overwrite`` checks everything first and
deletes only a job's own files, stale-temp cleanup spares users' files, the demo and
build-tokenizer never delete folders they did not write, writes are durable, and the tokenizer
identity hashes the tokenizer's files only. Jobs run in-process
(tests/preprocessing/inline_job.py)."""

from __future__ import annotations

import json
import os
import shutil
import types

import pytest

from pipeline import demo
from preprocessing import cli, output_guard
from preprocessing.tokenizer import BUILD_MARKER, tokenizer_identity
from tests.preprocessing.inline_job import llava_config, llava_inputs, run_inline
from vwlmm_data import storage


def _files(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, f), root): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(root) for f in fs}


@pytest.fixture
def no_deletes(monkeypatch):
    """Records every delete that goes through storage (none may happen)."""
    calls = []
    monkeypatch.setattr(storage, "remove_files", lambda *a, **k: calls.append(("files", a)))
    return calls


def test_overwrite_checks_everything_before_it_deletes(tmp_path, tokenizer_dir, monkeypatch,
                                                       no_deletes):
    data, images = llava_inputs(tmp_path)
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    # A mistyped tokenizer: nothing is deleted, nothing is written.
    cfg = llava_config(data, images, tmp_path / "tokenizr", user, overwrite=True)
    with pytest.raises(FileNotFoundError, match="tokenizr"):
        run_inline(monkeypatch, cfg)
    # A folder that is no job's output: refused with or without --overwrite.
    for overwrite in (True, False):
        cfg = llava_config(data, images, tokenizer_dir, user, overwrite=overwrite)
        with pytest.raises(ValueError, match="holds no preprocessing job"):
            run_inline(monkeypatch, cfg)
    assert _files(user) == {"thesis.tex": b"years of work"}
    # Locations no job may clear, refused before any listing or delete.
    home = tmp_path / "sub" / "home"
    home.mkdir(parents=True)
    for output, why in (("s3://bucket", "bucket root"), ("s3://bucket/", "bucket root"),
                        ("/", "filesystem root"), ("/tmp", "top-level folder"),
                        (str(home), "home folder"), (str(home.parent), "home folder"),
                        (str(tmp_path), "--input"), (str(images), "--image-root"),
                        (str(data), "--input")):
        monkeypatch.setenv("HOME", str(home) if "home" in why else "/nonexistent/home")
        cfg = llava_config(data, images, tokenizer_dir, output, overwrite=True)
        with pytest.raises(ValueError, match=why):
            run_inline(monkeypatch, cfg)
    assert no_deletes == []
    assert _files(user) == {"thesis.tex": b"years of work"}


def test_overwrite_and_cleanup_touch_only_the_job_files(tmp_path, tokenizer_dir, monkeypatch):
    data, images = llava_inputs(tmp_path)
    out = tmp_path / "out"
    run_inline(monkeypatch, llava_config(data, images, tokenizer_dir, out))
    job_files = _files(out)
    assert output_guard.MARKER_NAME in os.listdir(out / "_state")
    # A user's files beside the job's, one named like a temp file.
    (out / "notes.txt").write_text("mine")
    (out / ".tmp-draft").write_text("mine too")
    (out / "extra").mkdir()
    (out / "extra" / ".tmp-cache").write_text("also mine")
    # A temp file of a killed writer, which the rerun's cleanup removes.
    stale = out / "_state" / "units" / f"{storage.STAGING_PREFIX}abcd_123{storage.STAGING_SUFFIX}"
    stale.write_bytes(b"half")
    (out / "manifest.json").unlink()  # an unfinished job: the rerun resumes
    run_inline(monkeypatch, llava_config(data, images, tokenizer_dir, out))
    assert not stale.exists()
    assert (out / ".tmp-draft").exists() and (out / "extra" / ".tmp-cache").exists()
    # --overwrite: the job's files are deleted and rewritten, the user's stay.
    run_inline(monkeypatch, llava_config(data, images, tokenizer_dir, out, overwrite=True))
    after = _files(out)
    user = {"notes.txt": b"mine", ".tmp-draft": b"mine too", "extra/.tmp-cache": b"also mine"}
    assert after == {**job_files, **user}


def test_a_failed_first_run_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path, tokenizer_dir,
                                                                          monkeypatch):
    data, images = llava_inputs(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        run_inline(monkeypatch, llava_config(data, images, tmp_path / "tokenizr", out))
    assert not out.exists()
    summary = run_inline(monkeypatch, llava_config(data, images, tokenizer_dir, out))
    assert summary.manifest.num_samples == 3


def test_demo_never_deletes_folders_it_did_not_write(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "experiment.log").write_text("a user's run")
    # What follows claim_out: preprocessing done, the training launch fails.
    monkeypatch.setattr(demo, "preprocess", lambda out: out / "data")
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: types.SimpleNamespace(returncode=1))
    with pytest.raises(SystemExit, match="run that the demo did not write"):
        demo.main(["--out", str(tmp_path)])
    assert (tmp_path / "run" / "experiment.log").read_text() == "a user's run"
    # In a folder the demo marked, its own run folder is replaced.
    (tmp_path / demo.DEMO_MARKER).write_text("")
    with pytest.raises(SystemExit, match="training failed"):
        demo.main(["--out", str(tmp_path)])
    assert not (tmp_path / "run").exists()


def test_build_tokenizer_never_deletes_a_folder_it_did_not_write(tmp_path, tokenizer_dir, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    assert cli.main(["build-tokenizer", str(model)]) == 1
    assert "not empty and holds no tokenizer.json" in capsys.readouterr().err
    assert _files(model) == {"model.safetensors": b"weights"}
    # A tokenizer folder of somebody else's (no marker) is kept exactly as it is.
    theirs = tmp_path / "theirs"
    shutil.copytree(tokenizer_dir, theirs)
    (theirs / "tokenizer.model").unlink()
    (theirs / BUILD_MARKER).unlink()
    before = _files(theirs)
    assert cli.main(["build-tokenizer", str(theirs)]) == 0
    assert _files(theirs) == before


def test_new_folders_and_files_are_durable(tmp_path, monkeypatch):
    """fsync of the file, of the folder after the rename, and of the parent of every folder
    the write created (else a crash can lose a folder whose files were synced)."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "a" / "b" / "unit.json"
    storage.write_bytes(str(target), b"{}")
    t = str(tmp_path)
    assert synced[:2] == [t, f"{t}/a"]  # the new folders' entries
    assert synced[-1] == f"{t}/a/b" and len(synced) == 4  # the temp file, then its folder
    assert target.read_bytes() == b"{}"


def test_tokenizer_identity_hashes_the_tokenizer_files_only(tmp_path, tokenizer_dir, monkeypatch):
    folder = tmp_path / "vicuna"
    shutil.copytree(tokenizer_dir, folder)
    base = tokenizer_identity(str(folder))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(str(p)) or
                        real_open(p, *a, **k))
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(os.urandom(4096))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with_weights = tokenizer_identity(str(folder))
    assert with_weights.sha256 == base.sha256
    assert not any(p.endswith((".bin", "config.json")) and "tokenizer" not in p for p in opened)
    # A tokenizer file counts.
    (folder / "tokenizer_config.json").write_text(
        (folder / "tokenizer_config.json").read_text() + "\n")
    assert tokenizer_identity(str(folder)).sha256 != base.sha256

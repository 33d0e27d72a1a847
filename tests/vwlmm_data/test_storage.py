"""Local storage: atomic and durable writes, ranged reads, globbing. (S3: the same functions
against a real store in tests/preprocessing/test_s3.py.)"""

from __future__ import annotations

import os
import stat

import pytest

from vwlmm_data import storage


def test_writes_are_fsynced_then_renamed_then_the_folder_fsynced(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        assert os.path.dirname(src) == os.path.dirname(dst)  # one filesystem: rename is atomic
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "sub" / "m.json"
    storage.write_bytes(str(target), b"payload")
    # The new folder "sub" is made durable in its parent first, then the file, then its rename.
    assert events == ["fsync dir", "fsync file", "replace", "fsync dir"]
    assert target.read_bytes() == b"payload" and os.listdir(target.parent) == ["m.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "shard.tar"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with storage.StagedFile(str(target)) as staged:
            staged.file.write(b"half a new shard")
            raise RuntimeError("worker died")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["shard.tar"]


def test_ranged_reads_globs_and_listing(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.tar", "a/2.tar", "a/x.json"):
        storage.write_bytes(str(tmp_path / name), b"0123456789")
    assert storage.read_bytes(str(tmp_path / "a/1.tar"), start=3, end=7) == b"3456"
    assert storage.read_bytes(str(tmp_path / "a/1.tar"), start=8) == b"89"
    assert storage.expand(str(tmp_path / "a/*.tar")) == [str(tmp_path / "a/1.tar"),
                                                         str(tmp_path / "a/2.tar")]
    assert sorted(storage.list_prefix(str(tmp_path))) == sorted(
        str(tmp_path / n) for n in ("a/1.tar", "a/2.tar", "a/x.json"))
    assert not storage.exists(str(tmp_path / "a/3.tar"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "a/3.tar"))
    storage.remove_files([str(tmp_path / "a/1.tar"), str(tmp_path / "a/3.tar")])  # 3: missing
    assert sorted(os.listdir(tmp_path / "a")) == ["2.tar", "x.json"]

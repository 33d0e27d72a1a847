"""``RunLock``: one process per folder; the second is refused with the holder named; the lock of
a killed holder is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from vwlmm_data.run_lock import LOCK_NAME, RunLock, RunLockHeld, read_holder

HOLD = ("import sys; from vwlmm_data.run_lock import RunLock\n"
        "lock = RunLock(sys.argv[1], 'holder job').acquire()\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "out")
    try:
        with pytest.raises(RunLockHeld) as err:
            RunLock(str(tmp_path / "out"), "second job").acquire()
        assert err.value.holder.pid == proc.pid
        assert err.value.holder.host == socket.gethostname()
        assert f"PID {proc.pid}" in str(err.value) and "holder job" in str(err.value)
    finally:
        proc.stdin.close()
        proc.wait(30)
    # Released when the holder exits: the next one gets it.
    with RunLock(str(tmp_path / "out"), "third job"):
        assert read_holder(str(tmp_path / "out")).pid == os.getpid()
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    proc = _holder(tmp_path / "out")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert read_holder(str(tmp_path / "out")).pid == proc.pid  # its file is still there
    with RunLock(str(tmp_path / "out"), "next job"):
        holder = read_holder(str(tmp_path / "out"))
        assert (holder.pid, holder.what) == (os.getpid(), "next job")


def test_one_process_cannot_hold_a_folder_twice(tmp_path):
    with RunLock(str(tmp_path), "first"):
        with pytest.raises(RunLockHeld):
            RunLock(str(tmp_path), "second").acquire()


def test_s3_folders_are_refused():
    with pytest.raises(ValueError):
        RunLock("s3://bucket/out", "job")

"""One running job per folder: ``with RunLock(folder, "vwlmm-preprocess"):``.

Two jobs writing one output (a dataset, a run folder) interleave their files and one of them
dies on the other's staging files. The lock is a file in the folder (``LOCK_NAME``) holding the
holder's host, PID and start time, locked with a POSIX record lock (``fcntl.lockf``) by the
running process: the kernel releases it when the process ends, however it ends, so a lock left
by a killed job (its file still there, naming the dead job) is taken over by the next job
without any liveness guess, and a second job while the first runs is refused with the holder
named. A record lock belongs to the process alone: children it forks (data-loader workers, which
can outlive a SIGKILLed parent by seconds) do not inherit it, so they never keep a dead job's
folder locked. NFS carries POSIX locks across hosts (lockd / NFSv4).

The holder deletes the file when it releases the lock, while still holding it; a process that
won the lock on a file deleted meanwhile (it opened the path just before) sees that its inode is
no longer the path's and tries again, so two processes never both hold a folder. A POSIX lock is
dropped when its process closes *any* descriptor of the file, so the holder never opens the lock
file again (``read_holder`` is for the others).

Local folders only: S3 has no locks (``is_s3`` paths are refused).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Optional

from vwlmm_data.errors import Refusal
from vwlmm_data.storage import is_s3

LOCK_NAME = ".vwlmm-lock"
# Folders this process holds (real path -> holder): a second RunLock of one of them in the same
# process must be refused here, and must not open the file (closing it would drop the lock).
_HELD_HERE: dict = {}


@dataclass(frozen=True)
class LockHolder:
    """Who holds a folder: written into the lock file by the holder."""

    what: str
    host: str
    pid: int
    since: float  # time.time() when it took the lock

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{self.what} (host {self.host}, PID {self.pid}, since {started})"


class RunLockHeld(Refusal, RuntimeError):
    """Another process holds the folder; ``holder`` is None when it has not written its name
    yet."""

    def __init__(self, folder: str, holder: Optional[LockHolder]):
        self.folder, self.holder = folder, holder
        who = holder.describe() if holder else "another process (it is starting)"
        super().__init__(f"{folder} is in use by {who}: wait for it to finish or stop it; one "
                         "job at a time may write there")


def read_holder(folder: str) -> Optional[LockHolder]:
    """The holder named in ``folder``'s lock file (None: no file, or not written yet). The file
    of a process that died is still there: this says who last held it, not that it runs."""
    try:
        with open(os.path.join(folder, LOCK_NAME)) as f:
            return LockHolder(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """Exclusive use of ``folder`` (created if missing) by this process, as a context manager or
    with ``acquire()`` / ``release()``. ``what`` names the job in the refusal others get.

    Raises ``RunLockHeld`` at once (never waits) when another process holds it."""

    def __init__(self, folder: str, what: str):
        if is_s3(folder):
            raise ValueError(f"RunLock: {folder} is not a local folder")
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        os.makedirs(self.folder, exist_ok=True)
        key = os.path.realpath(self.folder)
        if key in _HELD_HERE:  # record locks never conflict within one process: check first
            raise RunLockHeld(self.folder, _HELD_HERE[key])
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                os.close(fd)
                raise RunLockHeld(self.folder, read_holder(self.folder)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder we waited on deleted this file: lock the new one
        holder = LockHolder(self.what, socket.gethostname(), os.getpid(), time.time())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD_HERE[key] = holder
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        _HELD_HERE.pop(os.path.realpath(self.folder), None)
        try:
            os.unlink(self.path)  # while still holding it (see the module docstring)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # closing it releases the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

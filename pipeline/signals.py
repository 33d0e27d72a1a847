"""Graceful stop: SIGTERM / SIGUSR1 / SIGINT ask the loop to checkpoint and exit at a step
boundary.

Slurm sends SIGTERM (or the ``--signal=USR1@T`` signal) to every task before killing a job;
torchrun forwards SIGTERM to its workers; Ctrl-C sends SIGINT to the whole process group. The
handler only sets a flag; the loop all-reduces it so every rank saves the same step together
even if only some ranks got the signal. A second SIGINT stops at once (Python's default).
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist


class PreemptionFlag:
    """Installs handlers for SIGTERM and SIGUSR1 and remembers whether one arrived."""

    def __init__(self, enabled: bool = True) -> None:
        self.received: Optional[int] = None
        self._previous = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum

    def any_rank_received(self) -> bool:
        """Collective: True on every rank if any rank got a signal (call on all ranks)."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""Fault-injection hooks for ``VWLMM_HOOKS`` (``vwlmm_data/hooks.py``): each factory returns
``{event: callback}`` for the process it is installed in."""

from __future__ import annotations

import os
import signal


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(event: str, at: str):
    def hook(iteration: int) -> None:
        if iteration == int(at):
            _kill_self()
    return {event: hook}


def kill_after_step(iteration: str):
    """SIGKILL right after training step ``iteration`` (and its save, if any)."""
    return _kill_at("train.after_step", iteration)


def kill_during_save(iteration: str):
    """SIGKILL once the shards of step ``iteration``'s save are written, before it commits."""
    return _kill_at("checkpoint.written", iteration)


def env(*entries: str) -> dict:
    """The environment addition that installs ``entries`` (``factory=argument``) of this
    module in a launched process."""
    return {"VWLMM_HOOKS": ",".join(f"tests.faults:{e}" for e in entries)}


def crash_unit_once(spec: str):
    """``UNIT:MARKER``: the Ray worker processing preprocessing unit UNIT dies halfway through
    it, once (the marker file records that it happened), as an OOM kill would."""
    target, _, marker = spec.partition(":")

    def hook(unit: int, done: int, total: int) -> None:
        if unit == int(target) and done == total // 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(17)
    return {"preprocess.unit_progress": hook}


def kill_after_dedup_tasks(count: str):
    """The preprocessing driver SIGKILLs itself once ``count`` tasks of the dedup step
    finished."""
    finished = [0]

    def hook(module: str) -> None:
        if module == "preprocessing.dedup":
            finished[0] += 1
            if finished[0] >= int(count):
                _kill_self()
    return {"preprocess.task_done": hook}


def crash_unit_always(unit: str):
    """Every Ray worker that processes preprocessing unit ``unit`` dies halfway through it: a
    unit that can never finish (a record too large for any worker)."""
    def hook(unit_index: int, done: int, total: int) -> None:
        if unit_index == int(unit) and done == total // 2:
            os._exit(17)
    return {"preprocess.unit_progress": lambda unit, done, total: hook(unit, done, total)}


def kill_after_eval_marker(iteration: str):
    """SIGKILL ``vwlmm-eval`` once the marker of its evaluation of the checkpoint of
    ``iteration`` is written, before the evaluation's records are published."""
    return _kill_at("eval.marked", iteration)

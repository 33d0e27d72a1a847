"""Bounded task submission on Ray: at most ``limit`` tasks in flight, results as they finish.

A job can have a million units. Submitting them all at once would put a million task specs (and
their arguments) into Ray's scheduler and object store; instead the next task is submitted only
when one finishes (back-pressure), and the arguments are drawn lazily from an iterator, so the
driver holds ``limit`` tasks' worth of arguments whatever the job's size.
"""

from __future__ import annotations

import os
import reprlib
from typing import Any, Callable, Iterable, Iterator

# Attempts after the first of a task whose worker died (killed, out of memory, node lost): a
# task that cannot finish fails the job, naming what it was working on, instead of running again
# and again.
MAX_RETRIES = 3
OOM_RETRIES_ENV = "RAY_task_oom_retries"


class TaskFailed(RuntimeError):
    """A task's worker died on every attempt; the message names the task and its unit."""


def bound_oom_retries() -> None:
    """Ray retries a task that its memory monitor killed without end (``task_oom_retries`` -1,
    ``max_retries`` not counted), so one record too large for a worker would hang the job.
    Bound it to ``MAX_RETRIES`` for the tasks this process owns, unless the user set it; Ray
    reads it when ``ray.init`` runs, so call this before."""
    os.environ.setdefault(OOM_RETRIES_ENV, str(MAX_RETRIES))


def describe_task(fn: Callable, args: tuple) -> str:
    """``fn`` and what it works on: a unit (a dict with ``index``) by its index and input file,
    other arguments shortened."""
    unit = next((a for a in args if isinstance(a, dict) and "index" in a), None)
    if unit is not None:
        where = f" of {unit['file']}" if "file" in unit else ""
        return f"{fn.__name__} on unit {unit['index']}{where}"
    return f"{fn.__name__}{reprlib.repr(args)}"


def bounded_executor(ray, limit: int, options: dict | None = None,
                     on_result: Callable[[Callable, Any], None] | None = None):
    """An ``Executor`` (``preprocessing/plan.py``) running each call as a Ray task (1 CPU, retried
    ``MAX_RETRIES`` times on worker death, then ``TaskFailed``); ``on_result(fn, result)`` sees
    every result as it arrives. An exception raised by the task's own code propagates as is."""
    if limit < 1:
        raise ValueError(f"at most {limit} tasks in flight: need at least 1")

    def run(fn: Callable[..., Any], args: Iterable[tuple]) -> Iterator[Any]:
        remote = ray.remote(fn).options(num_cpus=1, max_retries=MAX_RETRIES, **(options or {}))
        todo = iter(args)
        pending: dict = {}  # ref -> the task's arguments, to name it if it fails
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                nxt = next(todo, None)
                if nxt is None:
                    exhausted = True
                else:
                    pending[remote.remote(*nxt)] = nxt
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task_args = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError:
                    raise
                except ray.exceptions.RayError as exc:
                    raise TaskFailed(
                        f"{describe_task(fn, task_args)} did not finish: its worker died on "
                        f"each of {MAX_RETRIES + 1} attempts ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
                    ) from exc
                if on_result is not None:
                    on_result(fn, result)
                yield result

    return run

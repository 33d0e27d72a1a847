"""Bounded task submission on Ray: at most ``limit`` tasks in flight, results as they finish.

A job can have a million units. Submitting them all at once would put a million task specs (and
their arguments) into Ray's scheduler and object store; instead the next task is submitted only
when one finishes (back-pressure), and the arguments are drawn lazily from an iterator, so the
driver holds ``limit`` tasks' worth of arguments whatever the job's size.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator


def bounded_executor(ray, limit: int, options: dict | None = None,
                     on_result: Callable[[Callable, Any], None] | None = None):
    """An ``Executor`` (``preprocessing/plan.py``) running each call as a Ray task (1 CPU, retried
    on worker death); ``on_result(fn, result)`` sees every result as it arrives."""
    if limit < 1:
        raise ValueError(f"at most {limit} tasks in flight: need at least 1")

    def run(fn: Callable[..., Any], args: Iterable[tuple]) -> Iterator[Any]:
        remote = ray.remote(fn).options(num_cpus=1, max_retries=3, **(options or {}))
        todo = iter(args)
        pending: set = set()
        exhausted = False
        while True:
            while not exhausted and len(pending) < limit:
                nxt = next(todo, None)
                if nxt is None:
                    exhausted = True
                else:
                    pending.add(remote.remote(*nxt))
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.discard(ref)
                result = ray.get(ref)
                if on_result is not None:
                    on_result(fn, result)
                yield result

    return run

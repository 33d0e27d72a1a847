"""The one kind of error that entry points print as one line, without a traceback.

A ``Refusal`` is raised where the project declines to go on and its message already says what,
where and what to do (a damaged checkpoint with the setting that resumes from the previous one,
a token id outside the vocabulary with its shard and row, a folder in use with its holder). The
trainer's ``main`` prints it once and exits 2; anything else keeps its traceback.
"""

from __future__ import annotations


class Refusal(Exception):
    """A refusal whose message says all. ``same_on_every_rank``: every rank of a job raises it
    alike (rank 0 alone says it); otherwise each rank that meets it says it."""

    same_on_every_rank = False


def last_line(exc: BaseException) -> str:
    """The last line of an exception's message ("" for an empty one): what a wrapped error
    (a loader worker's traceback, torch's checkpoint exception) finally says."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else ""

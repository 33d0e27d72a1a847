"""A new user's shell, built from nothing: the project's ``bin`` folder and the system's on
``PATH``, an empty ``HOME``, and no other variable.

Nothing is copied from the test runner's environment, and nothing the project sets for itself
(Ray's auth mode and token, ``PYTHONPATH``) is added: a command that needs such a variable must
set it itself, or it fails here as it would for a user. ``tests/test_fresh_envs.py`` checks that
no test adds one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

BIN = Path(sys.executable).parent


def fresh_user_env(home: Path, **user_vars: str) -> Dict[str, str]:
    """The environment of a new user whose home folder is ``home`` (created empty); ``user_vars``
    are variables a user sets for their own reasons (``TMPDIR``), never the project's."""
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(home), **user_vars}

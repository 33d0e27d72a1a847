"""Named events where tests hook in (fault injection), with production code none the wiser.

Production code announces the points where a crash would leave a distinct state:
``fire("train.after_step", iteration=3)``. Nothing happens unless a hook is installed for that
event, and the code that fires never knows which hook (if any) runs: there is no fault setting
in any config and no branch on a test's name.

Hooks are installed in-process (``install``), or, for processes a launcher starts (torchrun
ranks, Ray workers), from the environment variable ``VWLMM_HOOKS``: comma-separated
``module:factory`` or ``module:factory=argument`` entries. Each factory is called once per
process (with the argument string, if any) and returns ``{event: callback}``; callbacks get the
event's keyword arguments. ``tests/faults.py`` holds the factories the suite uses.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, List, Optional

HOOKS_ENV = "VWLMM_HOOKS"

Callback = Callable[..., None]
_installed: Dict[str, List[Callback]] = {}
_loaded_spec: Optional[str] = None


def install(event: str, callback: Callback) -> None:
    _installed.setdefault(event, []).append(callback)


def _load_from_environment() -> None:
    """Install the factories ``VWLMM_HOOKS`` names (once per value of the variable)."""
    global _loaded_spec
    spec = os.environ.get(HOOKS_ENV, "")
    if spec == _loaded_spec:
        return
    _loaded_spec = spec
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        target, has_arg, argument = entry.partition("=")
        module_name, _, factory_name = target.partition(":")
        factory = getattr(importlib.import_module(module_name), factory_name)
        made = factory(argument) if has_arg else factory()
        for event, callback in made.items():
            install(event, callback)


def fire(event: str, **details) -> None:
    """Run the hooks installed for ``event`` (none in a normal run)."""
    _load_from_environment()
    for callback in _installed.get(event, ()):
        callback(**details)

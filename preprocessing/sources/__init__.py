"""The registry of raw-input sources: ``--source`` names -> ``Source`` objects.

The driver, the workers, the config and the CLI reach a source only through ``get_source``, so
a new kind of input is a module implementing ``base.Source`` plus one ``register`` call here;
the CLI's ``--source`` choices and help, and each source's own flags (``options.py``), come from
this registry.
"""

from __future__ import annotations

from preprocessing.sources.base import RawRecord, Scan, Source, content_digest, make_key
from preprocessing.sources.laion import LaionSource
from preprocessing.sources.llava import LlavaSource
from preprocessing.sources.options import option_names

__all__ = ["RawRecord", "Scan", "Source", "content_digest", "make_key", "canonical_name",
           "get_source", "option_owners", "register", "source_choices", "SOURCES"]

SOURCES: dict[str, Source] = {}
_ALIASES: dict[str, str] = {}


def register(source: Source) -> None:
    """Make ``source`` selectable as ``--source <name>`` (and its aliases)."""
    for name in (source.name, *source.aliases):
        if name in SOURCES or name in _ALIASES:
            raise ValueError(f"source name {name!r} is already registered")
    taken = option_owners()
    for name in option_names(source):
        if name in taken:
            raise ValueError(f"option {name!r} of source {source.name!r} is already an option "
                             f"of source {taken[name]!r}")
    SOURCES[source.name] = source
    _ALIASES.update({alias: source.name for alias in source.aliases})


def source_choices() -> tuple[str, ...]:
    """Every accepted ``--source`` value: the names, then the aliases."""
    return (*SOURCES, *_ALIASES)


def canonical_name(name: str) -> str:
    """``name`` with an alias resolved; KeyError for a name no source has."""
    name = _ALIASES.get(name, name)
    if name not in SOURCES:
        raise KeyError(name)
    return name


def option_owners() -> dict[str, str]:
    """Every registered source option -> the name of the source that declares it."""
    return {option: s.name for s in SOURCES.values() for option in option_names(s)}


def get_source(name: str) -> Source:
    try:
        return SOURCES[canonical_name(name)]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; choose from {source_choices()}") from None


register(LaionSource())
register(LlavaSource())

"""A source's own options, declared once as a dataclass next to the source.

Each field of ``Source.options`` becomes a ``vwlmm-preprocess`` flag (``max_punsafe`` ->
``--max-punsafe``, in a help group of that source), a field of the job's config
(``PreprocessConfig.source_options``, an instance of the dataclass) and a key of the manifest's
``config`` section, and the source reads it back as ``cfg.source_options.<name>``. So a source
with options of its own touches no shared file: the CLI, the config and the manifest take them
from the registry.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterable, Mapping


def option(default: Any, help: str, parse: Callable[[str], Any] = str) -> Any:
    """A field of a source's options: its default, its ``--help`` line and how its flag's value
    is parsed (``bool``: a switch)."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a source that has none."""


def option_names(source) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(source.options))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, sources: Iterable) -> None:
    """One help group per source with options; a flag left out stays out of the parsed
    arguments, so that only the options given reach ``build_options``."""
    for source in sources:
        fields = dataclasses.fields(source.options)
        if not fields:
            continue
        group = parser.add_argument_group(f"options of --source {source.name}")
        for f in fields:
            parse = f.metadata.get("parse", str)
            default = "off" if f.default is None else f.default
            help_text = f"{f.metadata.get('help', '')} (default {default})"
            kwargs = {"action": "store_true"} if parse is bool else {"type": parse}
            group.add_argument(flag(f.name), dest=f.name, default=argparse.SUPPRESS,
                               help=help_text.replace("%", "%%"), **kwargs)


def build_options(source, values: Any, owners: Mapping[str, str]) -> Any:
    """``source.options`` from ``values`` (an instance, a mapping of field values, or None for
    the defaults); ``owners`` names the source of each option of every source, for the error
    that an option was given to the wrong source."""
    if isinstance(values, source.options):
        return values
    values = dict(values or {})
    unknown = sorted(set(values) - set(option_names(source)))
    if unknown:
        where = ", ".join(f"{flag(n)} ({'--source ' + owners[n] if n in owners else 'unknown'})"
                          for n in unknown)
        raise ValueError(f"config field 'source_options': --source {source.name} has no "
                         f"option {where}")
    return source.options(**values)

"""The exceptions stlib raises for bad input, under one base the command line reports in one line.

Anything else that escapes a command is a bug in stlib, and the CLI shows its traceback instead.
The subclasses are also ``ValueError``\\s so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class StlibError(Exception):
    """A problem with what the user gave us (config, data, a model path), phrased for that person."""


class ConfigError(StlibError, ValueError):
    """A configuration problem: names the key, what was expected and what was given."""


class DataError(StlibError, ValueError):
    """A problem with the data or the split TOML: names the key or value at fault and what exists instead."""


class ModelLoadError(StlibError, ValueError):
    """The path does not hold a model we can load; the message says what was expected."""


def listing(values, limit: int = 20) -> str:
    """Short, sorted, readable list for error messages: 'a', 'b', ... (+3 more)."""
    items = sorted({str(v) for v in values})
    shown = ", ".join(repr(v) for v in items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return (shown + more) if items else "(none)"

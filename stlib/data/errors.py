"""The one exception type for bad data and bad split files.

A ``ValueError`` subclass so callers that already catch ``ValueError`` keep working; messages name the
key or value at fault, what was expected, and what exists instead.
"""


class DataError(ValueError):
    """A problem with the data or the split TOML, phrased for the person who prepared them."""


def listing(values, limit: int = 20) -> str:
    """Short, sorted, readable list for error messages: 'a', 'b', ... (+3 more)."""
    items = sorted({str(v) for v in values})
    shown = ", ".join(repr(v) for v in items[:limit])
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return (shown + more) if items else "(none)"

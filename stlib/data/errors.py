"""Data errors live in :mod:`stlib.errors`; this name stays for code that imports it from here."""

from stlib.errors import DataError, listing

__all__ = ["DataError", "listing"]

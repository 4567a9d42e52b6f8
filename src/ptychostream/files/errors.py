"""The error the file readers raise for a file that is not what they expect."""

from __future__ import annotations

__all__ = ["FileFormatError"]


class FileFormatError(ValueError):
    """A file that is not what the reader expects; the message names the file, the key and what was expected."""

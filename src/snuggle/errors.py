"""The one exception type that reaches the user as a single line (see cli.main)."""

from __future__ import annotations

__all__ = ["SnuggleError"]


class SnuggleError(Exception):
    """Bad input or an impossible request: the CLI prints `snuggle: error: <message>` and exits 2.

    Raise it with a message that names the file, key or value at fault and, where possible, the fix.
    Anything else that escapes is a bug and keeps its traceback.
    """

"""The one error a user sees as one line: a bad argument or input, before any work."""

from __future__ import annotations


class UsageError(Exception):
    """A bad argument or input: reported as one line, exit code 2, before any work."""

"""The one exception family that user-facing failures raise.

The CLI turns a `NormfixError` into a one-line message on stderr and its `exit_code`;
anything else that escapes is a bug and is reported as such.
"""

from __future__ import annotations


class NormfixError(Exception):
    """A user error: bad input file, bad option, unreadable checkpoint. Exit code 2."""

    exit_code = 2


class ValidationError(NormfixError):
    """A pass changed what it must not change (or the model disagrees with a reference).

    Exit code 1. Carries the figures that made the check fail.
    """

    exit_code = 1

    def __init__(self, message: str, *, stage: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.stage = stage
        self.details = details or {}

"""User-facing errors.

A ``UserError`` is a mistake the user can fix (bad path, unknown profile, bad
value). The CLI prints its message as one line and exits non-zero, with no
traceback. Always say which value was wrong and how to fix it::

    raise UserError(f"--pairs must be >= 1, got {n}. Pass a positive count.")
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names the value and the fix."""

    exit_code = 2

"""User-facing errors.

A ``UserError`` is a mistake the caller can fix (bad path, unknown profile, bad
value). It is a ``ValueError``: the library raises it with a message about the
value, naming the value and the fix. A parameter is named in backticks as a
Python caller passes it; the ``img`` CLI prints the message as one line, with
each such parameter shown as the flag that sets it, and exits 2 with no
traceback::

    raise UserError(f"`steps` must be >= 1, got {n}. The paper uses 50 (SDXL) / 30 (FLUX).")
    # Python:    ValueError: `steps` must be >= 1, got 0. The paper uses 50 (SDXL) / 30 (FLUX).
    # img infer: error: --steps must be >= 1, got 0. The paper uses 50 (SDXL) / 30 (FLUX).
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in the caller's input; the message names the value and the fix."""

    exit_code = 2

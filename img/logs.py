"""The one place that quiets third-party chatter (progress bars and expected warnings).

    from img.logs import quiet_loading, quiet_logger
    quiet_loading()                                  # no per-file "Loading weights" bars
    with quiet_logger("diffusers"):                  # ERROR level inside the block only
        pipe.load_ip_adapter(...)
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator


def quiet_loading() -> None:
    """Turn off the per-file "Loading weights" progress bars of transformers and diffusers (logs stay)."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_logger(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the given loggers (and their children, e.g. ``"diffusers"``) to ``level`` inside the block."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


def quiet(*names: str, level: int = logging.ERROR) -> None:
    """Raise the given loggers to ``level`` for the rest of the process (job set-up, not library calls)."""
    for n in names:
        logging.getLogger(n).setLevel(level)

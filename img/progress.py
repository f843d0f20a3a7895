"""The one progress-bar helper: rich bars on a terminal's stderr, nothing anywhere else.

    from img.progress import progress_bars
    with progress_bars(rate="pairs") as bars:     # a rate column: "12.30 pairs/s"
        task = bars.add_task("embed", total=1000, rate=0.0)
        bars.update(task, advance=8, rate=4.2)
    bars.shown                                    # False off a terminal (or disabled): every call is a no-op

Used by ``img jobs embed`` (pairs), ``img infer`` (prompts, diffusion steps) and ``img jobs train`` (steps).
"""
from __future__ import annotations

import sys
from typing import Any, Optional


class _NoBars:
    """What ``progress_bars`` returns when nothing is shown: the ``rich.progress.Progress`` calls we use, as no-ops."""

    shown = False

    def __enter__(self) -> "_NoBars":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: Optional[float] = None, **fields: Any) -> int:
        return 0

    def update(self, task: int, **kwargs: Any) -> None:
        pass

    def advance(self, task: int, advance: float = 1) -> None:
        pass

    def reset(self, task: int, **kwargs: Any) -> None:
        pass


def progress_bars(enabled: bool = True, *, rate: Optional[str] = None, eta: bool = False,
                  transient: bool = False, width: int = 0) -> Any:
    """A started-on-enter ``rich.progress.Progress`` on stderr, or a no-op stand-in when ``enabled`` is False or
    stderr is not a terminal (logs, CI, tests). ``rate``: a unit, for a ``{task.fields[rate]}`` column (pass
    ``rate=...`` to ``add_task``/``update``); ``eta``: a time-remaining column; ``width``: pad descriptions."""
    if not (enabled and sys.stderr.isatty()):
        return _NoBars()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [TextColumn(f"{{task.description:<{width}}}" if width else "{task.description}"),
                          BarColumn(), MofNCompleteColumn()]
    if rate:
        columns.append(TextColumn(f"{{task.fields[rate]:.2f}} {rate}/s"))
    columns.append(TimeElapsedColumn())
    if eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    bars = Progress(*columns, console=Console(stderr=True), transient=transient)
    bars.shown = True
    return bars

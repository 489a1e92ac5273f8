"""Progress of long steps (Inception features, the domain network's training, study arms,
exporting samples, reading many files) with ``rich``: a live bar on an interactive terminal,
nothing in logs and pipes, where a bar would only add noise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: Steps shorter than this many items show no bar.
MIN_ITEMS = 2


def interactive() -> bool:
    """Whether standard error is a terminal a person is watching."""
    return sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yields ``items``, drawing a transient ``rich`` progress bar on an interactive terminal.

    Args:
        items: What to iterate.
        description: What the step does (e.g. ``"Inception features"``).
        total: How many items (``len(items)`` where it has one).
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not interactive() or (total is not None and total < MIN_ITEMS):
        yield from items
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    console = Console(stderr=True, force_terminal=True)
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)

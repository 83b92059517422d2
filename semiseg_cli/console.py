"""Terminal output: progress and messages go to stderr, results to stdout.

On a terminal `progress()` shows a live rich bar; otherwise (CI, logs, pipes) it prints one plain line
every `every` items so that logs stay readable. A progress nested in another (the evaluation inside
training) prints plain lines too: they appear above the outer bar (rich 13 allows one live display per console).
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from rich.console import Console

T = TypeVar("T")
# soft_wrap: a message is one line however long (rich would hard-wrap at 80 columns off a terminal, mid-record)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)
_live_bars = 0  # rich bars of `progress` now shown on `err`


def progress(items: Iterable[T], total: int | None = None, desc: str = "", every: int | None = None) -> Iterator[T]:
    """Iterate over `items`, reporting progress on stderr.

    Args:
        items: what to iterate over.
        total: number of items (taken from len(items) when omitted and available).
        desc: a short label.
        every: on a non-terminal, print a line every this many items (default: about 10 lines).
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    global _live_bars
    if err.is_terminal and not _live_bars:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
        _live_bars += 1
        try:
            with Progress(*cols, console=err, transient=False) as bar:
                task = bar.add_task(desc, total=total)
                for item in items:
                    yield item
                    bar.advance(task)
        finally:
            _live_bars -= 1
        return
    every = every or max(1, (total or 100) // 10)
    start, n = time.time(), 0
    for item in items:
        yield item
        n += 1
        if n % every == 0 or n == total:
            of = f"/{total}" if total else ""
            print(f"{desc} {n}{of} ({time.time() - start:.1f}s)", file=sys.stderr, flush=True)

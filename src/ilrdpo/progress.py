"""Console output: one rich console on stderr, progress bars with ETA, stage timers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class Bar:
    def __init__(self, progress: Progress | None, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, **fields: str) -> None:
        if self._progress is None:
            return
        update = {"info": "  ".join(f"{k}={v}" for k, v in fields.items())} if fields else {}
        self._progress.update(self._task, advance=n, **update)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Bar]:
    """A progress bar with count, elapsed time and ETA; silent when ILRDPO_QUIET is set."""
    if os.environ.get("ILRDPO_QUIET"):
        yield Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=False,
    )
    with progress:
        yield Bar(progress, progress.add_task(description, total=total, info=""))


@contextmanager
def stage(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Print the wall time of a stage (and on CUDA its peak GPU memory) and record the time in `timings`."""
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + elapsed
    memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" \
        if cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()) else ""
    console.print(f"[dim]{name}: {elapsed:.1f} s{memory}[/dim]")

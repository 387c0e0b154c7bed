"""Console output: one rich console on stderr, progress bars with ETA, stage timers.

In a terminal progress is a rich bar; in a log (stderr not a terminal) it is plain lines: one when
a stage or a bar starts, one at least every PLAIN_EVERY_S seconds while it runs (a bar's with
done/total, the elapsed time and an ETA) and one at the end.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
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
PLAIN_EVERY_S = 30.0  # a log gets a progress line at least this often

# What the log's periodic line says: the innermost work in progress (a bar inside a stage) last.
_reporting: list[Callable[[], str]] = []


def _fields(fields: dict[str, str]) -> str:
    return "  ".join(f"{k}={v}" for k, v in fields.items())


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _plain(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _plain_lines() -> bool:
    """Progress as plain lines: stderr is not a terminal (a log, a pipe) and nobody asked for quiet."""
    return not console.is_terminal and not os.environ.get("ILRDPO_QUIET")


@contextmanager
def _reported(line: Callable[[], str]) -> Iterator[None]:
    """While inside, a timer thread writes line() every PLAIN_EVERY_S seconds (the innermost
    reported work's line), also while one long batch or a model load runs."""
    _reporting.append(line)
    stop = threading.Event()
    timer = None
    if len(_reporting) == 1:
        def tick() -> None:
            while not stop.wait(PLAIN_EVERY_S):
                with contextlib.suppress(IndexError):  # the work ended between the wait and the read
                    _plain(_reporting[-1]())

        timer = threading.Thread(target=tick, daemon=True)
        timer.start()
    try:
        yield
    finally:
        _reporting.pop()
        stop.set()
        if timer is not None:
            timer.join()


class Bar:
    def __init__(self, progress: Progress | None, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, **fields: str) -> None:
        if self._progress is None:
            return
        update = {"info": _fields(fields)} if fields else {}
        self._progress.update(self._task, advance=n, **update)


class PlainBar:
    """A progress bar as plain lines for a log. The ETA counts only the work done since the start
    (not what a resumed stage found finished)."""

    def __init__(self, description: str, total: int, done: int = 0) -> None:
        self.description, self.total, self.done, self.resumed = description, total, done, done
        self.info, self.start = "", time.monotonic()

    def advance(self, n: float = 1, **fields: str) -> None:
        self.done += n
        self.info = _fields(fields) if fields else self.info

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        new = self.done - self.resumed
        eta = _clock((self.total - self.done) * elapsed / new) if new > 0 else "?"
        return "  ".join(filter(None, [f"{self.description}: {self.done:g}/{self.total}",
                                       f"elapsed {_clock(elapsed)}", f"eta {eta}", self.info]))


@contextmanager
def progress_bar(description: str, total: int, done: int = 0) -> Iterator[Bar | PlainBar]:
    """Progress of `total` units, `done` of them finished before (a resumed stage): a rich bar with
    count, elapsed time and ETA in a terminal; in a log a line at the start, at least every
    PLAIN_EVERY_S seconds and at the end; nothing when ILRDPO_QUIET is set."""
    if _plain_lines():
        bar = PlainBar(description, total, done)
        _plain(f"{description}: {done:g}/{total}" + (f" ({done:g} done before, reused)" if done else ""))
        with _reported(bar.line):
            yield bar
        _plain(bar.line())
        return
    if os.environ.get("ILRDPO_QUIET"):
        yield Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=False,
    )
    with progress:
        yield Bar(progress, progress.add_task(description, total=total, completed=done, info=""))


@contextmanager
def stage(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Print the wall time of a stage (and on CUDA its peak GPU memory) and record the time in
    `timings`; in a log also a line when it starts and, outside progress bars, every PLAIN_EVERY_S."""
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if _plain_lines():
        _plain(f"{name}: started")
    with _reported(lambda: f"{name}: running, elapsed {_clock(time.perf_counter() - start)}") \
            if _plain_lines() else contextlib.nullcontext():
        yield
    elapsed = time.perf_counter() - start
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + elapsed
    memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" \
        if cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()) else ""
    console.print(f"[dim]{name}: {elapsed:.1f} s{memory}[/dim]")

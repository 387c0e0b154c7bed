"""Ctrl-C and SIGTERM: stop at once, in one line, with the shell's exit status.

The command line (`handled()`) turns SIGINT and SIGTERM into `Interrupted`, raised in the main
thread at its next Python instruction. It is a BaseException, so no `except Exception` on the way
swallows it, and not a KeyboardInterrupt, which click turns into a return value. Every write of a
run is atomic or an fsynced line and every stage resumes from what is on disk, so any instruction
is a safe point: the files are those of a killed process, and the same command resumes them to the
same result. The loop names the stage that was running, and commands that resume say so
(`where`). A second signal while the first one unwinds (a model still loading, a thread still
decoding) ends the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# the shell's status for a process ended by a signal: 128 + the signal number
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; `where` is the stage that was running, when one was, and
    `resume` how to pick up from the files, for a command that can (both set by `where()`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = EXIT_CODES[signum]
        self.where: str | None = None
        self.resume: str | None = None  # how to go on, where the command resumes

    def message(self) -> str:
        place = f" in {self.where}" if self.where else ""
        return f"stopped{place}" + (f"; {self.resume}" if self.resume else "")


_received: list[int] = []


def _handle(signum: int, frame) -> None:
    if _received:  # the second signal: no more unwinding
        os.write(2, b"stopped at once\n")
        os._exit(EXIT_CODES[signum])
    _received.append(signum)
    raise Interrupted(signum)


@contextmanager
def handled() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM raise Interrupted (main thread only: signal handlers live there);
    the handlers before are back afterwards (a test calling the command line in-process keeps its own)."""
    _received.clear()
    before = {signum: signal.signal(signum, _handle) for signum in EXIT_CODES}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@contextmanager
def where(description: str | None = None, resume: str = "rerun the same command to resume") -> Iterator[None]:
    """Work that resumes when run again, named by description (the innermost name wins) in an
    Interrupted that passes through, which also says how to resume (the outermost word wins: the
    command knows best)."""
    try:
        yield
    except Interrupted as stop:
        stop.where = stop.where or description
        stop.resume = resume
        raise


def exit_for(stop: Interrupted) -> None:
    """The one line and the exit status, at once: the `finally` blocks on the way out have released
    the lock and closed the trackers, and the interpreter's own teardown takes seconds with torch
    loaded (what a user waits for after Ctrl-C)."""
    print(stop.message(), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(stop.exit_code)

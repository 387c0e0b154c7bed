"""Fault injection for the resume tests: the process "dies", or waits, right after a chosen write.

ILRDPO_FAULT=NAME:K makes the K-th write of a file named NAME (every atomic write and every
appended line goes through fault_point) raise SimulatedCrash, as if the process had been
killed there. ILRDPO_WAIT=NAME:K makes the process print one line to stderr after that write and
sleep, so that a test can send it a signal inside a chosen stage. Unset, they cost two
environment lookups per write.
"""

from __future__ import annotations

import os
import sys
import time

_hits: dict[tuple[str, str], int] = {}
WAIT_S = 600.0


class SimulatedCrash(BaseException):
    """A BaseException, so that no `except Exception` on the way swallows it."""


def fault_point(name: str) -> None:
    for variable in ("ILRDPO_FAULT", "ILRDPO_WAIT"):
        spec = os.environ.get(variable)
        if not spec:
            continue
        target, _, count = spec.rpartition(":")
        if target != name:
            continue
        hits = _hits[variable, name] = _hits.get((variable, name), 0) + 1
        if hits != int(count):
            continue
        if variable == "ILRDPO_FAULT":
            raise SimulatedCrash(f"fault injected after write {hits} of {name}")
        print(f"waiting after write {hits} of {name} ({variable})", file=sys.stderr, flush=True)
        time.sleep(WAIT_S)


def reset() -> None:
    """Forget the write counts (a test starts each injected run from zero)."""
    _hits.clear()

"""Fault injection for the resume tests: the process "dies" right after a chosen write.

ILRDPO_FAULT=NAME:K makes the K-th write of a file named NAME (every atomic write and every
appended line goes through fault_point) raise SimulatedCrash, as if the process had been
killed there. Unset, it costs one environment lookup per write.
"""

from __future__ import annotations

import os

_hits: dict[str, int] = {}


class SimulatedCrash(BaseException):
    """A BaseException, so that no `except Exception` on the way swallows it."""


def fault_point(name: str) -> None:
    spec = os.environ.get("ILRDPO_FAULT")
    if not spec:
        return
    target, _, count = spec.rpartition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count):
        raise SimulatedCrash(f"fault injected after write {_hits[name]} of {name}")


def reset() -> None:
    """Forget the write counts (a test starts each injected run from zero)."""
    _hits.clear()

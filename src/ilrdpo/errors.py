"""Errors that reach the user as one line and an exit status, never as a traceback."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path


class IlrdpoError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 1


class UserInputError(IlrdpoError):
    """Bad input (file, line, config key): exit status 2."""

    exit_code = 2


class TrainingDiverged(IlrdpoError):
    """A non-finite loss; the last good model on disk is kept."""

    exit_code = 1


class DiskFullError(IlrdpoError):
    """No space left on a disk (or the quota is used up) while writing: exit status 2, like bad
    input, since the fix is the user's (free space) and the same command then resumes."""

    exit_code = 2


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Writers that report a full disk without an OSError: safetensors (SafetensorError "... No space left
# on device (os error 28)") and torch.save's C++ zip writer (caffe2's PyTorchStreamWriter), which
# drops the errno: "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534".
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
SHORT_WRITE_TEXTS = ("inline_container", "unexpected pos", "file write failed")


def _reports_full_disk(error: Exception, folder: Path, needed: int | None) -> bool:
    text = str(error)
    if any(mark in text for mark in DISK_FULL_TEXTS):
        return True
    if not any(mark in text for mark in SHORT_WRITE_TEXTS):
        return False
    free = free_bytes(folder)  # a short write with space to spare is some other fault
    return free is not None and free < max(needed or 0, 1 << 20)


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(folder: Path) -> int | None:
    """Space left to this user where `folder` (or its nearest existing parent) lives."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def disk_full_message(folder: str | Path, needed: int | None = None) -> str:
    folder = Path(folder)
    free = free_bytes(folder)
    left = "no space left" if free is None else f"{human_bytes(free)} left"
    need = f", about {human_bytes(needed)} needed" if needed else ""
    return (f"{folder}: disk full ({left}{need}); free some space there and run the same command again: "
            "it resumes where it stopped")


@contextlib.contextmanager
def disk_writes(folder: str | Path, needed: int | None = None) -> Iterator[None]:
    """Around one write primitive: a full disk (ENOSPC, EDQUOT, or torch's errno-less short write
    while space is short) becomes one DiskFullError line naming the folder. The primitive itself
    keeps what is finished intact (temp file + rename), so the same command resumes."""
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        raise DiskFullError(disk_full_message(folder, needed)) from None
    except Exception as error:
        if not _reports_full_disk(error, Path(folder), needed):
            raise
        raise DiskFullError(disk_full_message(folder, needed)) from None

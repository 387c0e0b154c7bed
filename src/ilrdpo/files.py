"""JSON and JSONL files: strict reading with `FILE:LINE` errors (NaN, Infinity and bad bytes
refused), atomic writes, fsynced appends, progress files read tolerantly (a torn tail dropped) and
finished outputs read strictly. Writes only: the caller decides who writes (`if ranks.is_main():`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ilrdpo.errors import UserInputError, disk_writes
from ilrdpo.faults import fault_point


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON; write a number or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a float")
    return value


def _decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserInputError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                             f"{error.start + 1}); save the file as UTF-8") from None


def _existing_file(path: Path, kind: str) -> Path:
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder, expected a {kind} file")
    if not path.is_file():
        raise UserInputError(f"{path}: file not found")
    return path


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; bad bytes or invalid JSON (NaN and
    Infinity included) are FILE:LINE errors."""
    path = _existing_file(Path(path), "JSONL")
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line = _decode_line(raw, f"{path}:{line_no}")
            if not line.strip():
                continue
            hint = _array_hint(line)
            try:
                obj = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
            except json.JSONDecodeError as error:
                raise UserInputError(f"{path}:{line_no}: invalid JSON ({error.msg}){hint}") from None
            except (ValueError, RecursionError) as error:
                reason = str(error) if isinstance(error, ValueError) else "nested too deeply"
                raise UserInputError(f"{path}:{line_no}: invalid JSON ({reason}){hint}") from None
            if not isinstance(obj, dict):
                raise UserInputError(f"{path}:{line_no}: expected a JSON object{hint}")
            yield line_no, obj


def _array_hint(line: str) -> str:
    """A JSON array saved as .jsonl is the common way to get JSONL wrong: say so."""
    if not line.lstrip().startswith("["):
        return ""
    return ("; this is a JSON array, and JSONL holds one object per line: write each element on its own line "
            "without the [ ] (`jq -c '.[]' FILE`)")


def read_json_file(path: str | Path) -> Any:
    """A whole JSON file (state.json, eval.json, config.json); any problem is one line naming it."""
    path = _existing_file(Path(path), "JSON")
    text = _decode_line(path.read_bytes(), str(path))
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as error:
        raise UserInputError(f"{path}:{error.lineno}: invalid JSON ({error.msg}); "
                             "restore the file or remove it") from None
    except (ValueError, RecursionError):
        raise UserInputError(f"{path}: invalid JSON; restore the file or remove it") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers never see half a file, and
    a full disk (DiskFullError) leaves the old file as it was. Under several processes the caller
    decides who writes (`if ranks.is_main():`)."""
    path = Path(path)
    with disk_writes(path.parent, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary shared outputs
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            fault_point(path.name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    # allow_nan=False: a NaN or inf that got this far is a bug; never write a file that is not JSON.
    lines = [json.dumps(_as_dict(row), ensure_ascii=False, allow_nan=False) + "\n" for row in rows]
    atomic_write_text(path, "".join(lines))


def append_jsonl(path: str | Path, row: Any) -> None:
    """Append one line and fsync, so a killed process keeps every finished line (a torn last line,
    from a kill or a full disk, is dropped by read_jsonl_tolerant). Under several processes the
    caller decides who writes (the main process, or each its own ranks.rank_file)."""
    path = Path(path)
    line = (json.dumps(_as_dict(row), ensure_ascii=False) + "\n").encode("utf-8")
    with disk_writes(path.parent, len(line)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    fault_point(path.name)


def _progress_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(rows, bytes they fill) of a progress file up to its first line that is not a whole JSON
    object: the tail a killed writer tore (inside a multi-byte character included: each line is
    decoded on its own) is left out, to be redone."""
    rows, good = [], 0
    with path.open("rb") as handle:
        for raw in handle:
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                break
            if not isinstance(row, dict) or not raw.endswith(b"\n"):
                break
            rows.append(row)
            good += len(raw)
    return rows, good


def read_jsonl_tolerant(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a progress file written by append_jsonl (read only progress files so: a finished
    stage's output is read strictly, read_finished_jsonl); a torn tail is dropped."""
    path = Path(path)
    return _progress_rows(path)[0] if path.exists() else []


def recover_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a progress file before appending to it again: a torn tail (a writer killed
    mid-line) is cut off, or the next append would join it and hide every later line."""
    path = Path(path)
    if not path.exists():
        return []
    rows, good = _progress_rows(path)
    if good != path.stat().st_size:
        with path.open("rb") as handle:
            atomic_write_text(path, handle.read(good).decode("utf-8"))
    return rows


def read_finished_jsonl(path: str | Path, redo: str) -> list[dict[str, Any]]:
    """Rows of a finished stage's output (written whole, atomically): read strictly, since a line
    lost there would silently change every later result. A damaged or missing file is one line
    naming it (and the line) and what to do: `redo`."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: missing, but the stage that writes it has finished; {redo}")
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        line_no = data.count(b"\n") + 1
        raise UserInputError(f"{path}:{line_no}: damaged (the file ends inside this line); {redo}")
    with finished_output(redo):
        return [row for _, row in iter_jsonl(path)]


@contextlib.contextmanager
def finished_output(redo: str) -> Iterator[None]:
    """Around reading a finished stage's output with a reader made for users' files: what is
    wrong there is damage, and the way out is `redo` (the fix a user file's error suggests is not)."""
    try:
        yield
    except UserInputError as error:
        raise UserInputError(f"{str(error).partition('; ')[0]} (damaged); {redo}") from None


def _as_dict(row: Any) -> dict[str, Any]:
    return asdict(row) if hasattr(row, "__dataclass_fields__") else row

"""Typed records passed between stages, and their JSONL files (validated, written atomically).

A bad line is reported as `FILE:LINE: what is wrong` (UserInputError, exit status 2).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ilrdpo.errors import UserInputError

Messages = list[dict[str, str]]
PromptText = str | Messages


@dataclass
class Prompt:
    prompt: PromptText
    id: str = ""
    reference: str | None = None
    target_length: int | None = None


@dataclass
class PreferencePair:
    prompt: PromptText
    chosen: str
    rejected: str
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    margin: float | None = None
    target_length: int | None = None


@dataclass
class CandidateSet:
    """All N answers of one prompt, in sampling order; pairs index into these lists."""

    prompt: PromptText
    id: str
    responses: list[str]
    n_tokens: list[int]
    truncated: list[bool]
    rewards: list[float] = field(default_factory=list)
    reference: str | None = None
    target_length: int | None = None


# --- JSONL -------------------------------------------------------------------------------------


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; invalid JSON is a FILE:LINE error."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: file not found")
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserInputError(f"{path}:{line_no}: invalid JSON ({error.msg})") from None
            if not isinstance(obj, dict):
                raise UserInputError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, obj


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary shared outputs
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    lines = [json.dumps(_as_dict(row), ensure_ascii=False) + "\n" for row in rows]
    atomic_write_text(path, "".join(lines))


def append_jsonl(path: str | Path, row: Any) -> None:
    """Append one line and fsync, so a killed process keeps every finished line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(_as_dict(row), ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl_tolerant(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a progress file written by append_jsonl; a torn last line (killed writer) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def recover_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a progress file before appending to it again: a torn last line (a writer killed
    mid-line) is cut off, or the next append would join it and hide every later line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = read_jsonl_tolerant(path)
    valid = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if path.read_text(encoding="utf-8") != valid:
        atomic_write_text(path, valid)
    return rows


def _as_dict(row: Any) -> dict[str, Any]:
    return asdict(row) if hasattr(row, "__dataclass_fields__") else row


# --- validation --------------------------------------------------------------------------------


def _check_messages(value: Any, where: str, name: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise UserInputError(f"{where}: '{name}' must be a non-empty string or list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UserInputError(f"{where}: '{name}'[{i}] must be an object with string 'role' and 'content'")
    return value


def _text_or_messages(obj: dict[str, Any], name: str, where: str) -> PromptText:
    if name not in obj:
        raise UserInputError(f"{where}: missing field '{name}'")
    value = obj[name]
    if isinstance(value, str):
        if not value.strip():
            raise UserInputError(f"{where}: field '{name}' is empty")
        return value
    return _check_messages(value, where, name)


def _optional(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise UserInputError(f"{where}: field '{name}' has the wrong type")
    return value


def answer_text(value: PromptText, where: str, name: str) -> str:
    """The answer of a chosen/rejected field: a string, or the last assistant message's content."""
    if isinstance(value, str):
        return value
    last = value[-1]
    if last["role"] != "assistant":
        raise UserInputError(f"{where}: '{name}' must end with an assistant message")
    if not last["content"].strip():
        raise UserInputError(f"{where}: field '{name}' has an empty answer")
    return last["content"]


def prompt_from_row(obj: dict[str, Any], where: str, index: int = 0) -> Prompt:
    prompt = _text_or_messages(obj, "prompt", where)
    target = _optional(obj, "target_length", int, where)
    reference = _optional(obj, "reference", str, where)
    raw_id = obj.get("id", f"{index}")
    return Prompt(prompt=prompt, id=str(raw_id), reference=reference, target_length=target)


def pair_from_row(obj: dict[str, Any], where: str) -> PreferencePair:
    """Standard (strings) or conversational (message lists) pairs; with no 'prompt' field the
    prompt is the shared history of chosen and rejected (TRL's implicit-prompt format)."""
    chosen_raw = _text_or_messages(obj, "chosen", where)
    rejected_raw = _text_or_messages(obj, "rejected", where)
    if "prompt" in obj:
        prompt = _text_or_messages(obj, "prompt", where)
    elif isinstance(chosen_raw, list) and isinstance(rejected_raw, list) and len(chosen_raw) > 1:
        prompt = chosen_raw[:-1]
        if rejected_raw[:-1] != prompt:
            raise UserInputError(f"{where}: chosen and rejected do not share the same prompt messages")
    else:
        raise UserInputError(f"{where}: missing field 'prompt'")
    scores = {name: _optional(obj, name, (int, float), where)
              for name in ("chosen_reward", "rejected_reward", "margin")}
    return PreferencePair(
        prompt=prompt,
        chosen=answer_text(chosen_raw, where, "chosen"),
        rejected=answer_text(rejected_raw, where, "rejected"),
        target_length=_optional(obj, "target_length", int, where),
        **scores,
    )


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    prompts = []
    for line_no, obj in iter_jsonl(path):
        prompts.append(prompt_from_row(obj, f"{path}:{line_no}", index=len(prompts)))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserInputError(f"{path}: no prompts")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise UserInputError(f"{path}: duplicate prompt ids")
    return prompts


def read_pairs(path: str | Path, limit: int | None = None) -> list[PreferencePair]:
    pairs = []
    for line_no, obj in iter_jsonl(path):
        pairs.append(pair_from_row(obj, f"{path}:{line_no}"))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise UserInputError(f"{path}: no preference pairs")
    return pairs

"""Typed records passed between stages (Prompt, PreferencePair, CandidateSet), read and validated
from their JSONL files (ilrdpo.files). A bad line is reported as `FILE:LINE: what is wrong`
(UserInputError, exit status 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilrdpo.errors import UserInputError
from ilrdpo.files import iter_jsonl, read_finished_jsonl

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
    # Cut by max_new_tokens: such an answer is trained without an EOS it never generated.
    chosen_truncated: bool = False
    rejected_truncated: bool = False
    # Tokens generated for each answer (pairs made from candidates); None for text from outside,
    # whose tokenisation is its length (data.pair_lengths).
    chosen_n_tokens: int | None = None
    rejected_n_tokens: int | None = None


@dataclass
class CandidateSet:
    """All N answers of one prompt, in sampling order; pairs index into these lists."""

    prompt: PromptText
    id: str
    responses: list[str]
    n_tokens: list[int]
    truncated: list[bool]
    rewards: list[float] = field(default_factory=list)  # quality plus the configured length bias
    quality: list[float] = field(default_factory=list)  # the scorer's own values
    reference: str | None = None
    target_length: int | None = None


def read_candidates(path: str | Path, redo: str) -> list[CandidateSet]:
    """candidates.jsonl as written by the generate and score stages (a finished output: strict)."""
    sets = []
    for line_no, row in enumerate(read_finished_jsonl(path, redo), start=1):
        try:
            sets.append(CandidateSet(**row))
        except TypeError:
            raise UserInputError(f"{path}:{line_no}: damaged (not a candidate record); {redo}") from None
    return sets


# --- validation --------------------------------------------------------------------------------


def lone_surrogate(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate, U+D800..U+DFFF: what a
    JSON escape like \\ud800 without its pair decodes to): no tokenizer takes it, no file holds it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def check_text(value: Any, where: str, name: str = "") -> None:
    """Every string in a record (keys and values, at any depth) is text a tokenizer and a UTF-8
    file can take; else one line naming the field and the character."""
    if isinstance(value, str):
        at = lone_surrogate(value)
        if at is not None:
            field_name = f"field '{name}'" if name else "a field name"
            raise UserInputError(f"{where}: {field_name} holds U+{ord(value[at]):04X} at character {at + 1}, a lone "
                                 "surrogate that is not text (a \\uD800-\\uDFFF escape without its pair); "
                                 "remove it or write the whole character")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where, name)
            check_text(item, where, f"{name}.{key}" if name else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, where, f"{name}[{i}]")


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


def _n_tokens(obj: dict[str, Any], name: str, where: str) -> int | None:
    n = _optional(obj, name, int, where)
    if n is not None and n < 0:
        raise UserInputError(f"{where}: field '{name}' is {n}; it must be a token count >= 0")
    return n


def _target_length(obj: dict[str, Any], where: str) -> int | None:
    target = _optional(obj, "target_length", int, where)
    if target is not None and target < 0:
        raise UserInputError(f"{where}: field 'target_length' is {target}; it must be a token count >= 0")
    return target


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
    check_text(obj, where)
    prompt = _text_or_messages(obj, "prompt", where)
    target = _target_length(obj, where)
    reference = _optional(obj, "reference", str, where)
    raw_id = obj.get("id", f"{index}")
    if isinstance(raw_id, (dict, list)) or raw_id is None:
        raise UserInputError(f"{where}: field 'id' must be a string or a number")
    return Prompt(prompt=prompt, id=str(raw_id), reference=reference, target_length=target)


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit prompt of string pairs: (prompt, chosen answer, rejected answer), the prompt
    being the longest common prefix, less a space just before the answers begin."""
    end = 0
    while end < min(len(chosen), len(rejected)) and chosen[end] == rejected[end]:
        end += 1
    if 0 < end < min(len(chosen), len(rejected)) and chosen[end - 1] == " ":
        end -= 1
    return chosen[:end], chosen[end:], rejected[end:]


def pair_from_row(obj: dict[str, Any], where: str) -> PreferencePair:
    """Standard (strings) or conversational (message lists) pairs; with no 'prompt' field the
    prompt is the shared history of chosen and rejected (TRL's implicit-prompt format)."""
    check_text(obj, where)
    chosen_raw = _text_or_messages(obj, "chosen", where)
    rejected_raw = _text_or_messages(obj, "rejected", where)
    if "prompt" in obj:
        prompt = _text_or_messages(obj, "prompt", where)
    elif isinstance(chosen_raw, list) and isinstance(rejected_raw, list) and len(chosen_raw) > 1:
        prompt = chosen_raw[:-1]
        if rejected_raw[:-1] != prompt:
            raise UserInputError(f"{where}: chosen and rejected do not share the same prompt messages")
    elif isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        prompt, chosen_raw, rejected_raw = split_shared_prefix(chosen_raw, rejected_raw)
        if not prompt.strip():
            raise UserInputError(f"{where}: missing field 'prompt' (and chosen and rejected share no prompt text)")
    else:
        raise UserInputError(f"{where}: missing field 'prompt'")
    scores = {name: _optional(obj, name, (int, float), where)
              for name in ("chosen_reward", "rejected_reward", "margin")}
    chosen, rejected = answer_text(chosen_raw, where, "chosen"), answer_text(rejected_raw, where, "rejected")
    if chosen == rejected:
        # Identical answers give a zero margin and a zero gradient: the pair teaches nothing.
        raise UserInputError(f"{where}: 'chosen' and 'rejected' are the same answer; remove the pair")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected,
                          target_length=_target_length(obj, where), **scores,
                          chosen_truncated=obj.get("chosen_truncated") is True,
                          rejected_truncated=obj.get("rejected_truncated") is True,
                          **{name: _n_tokens(obj, name, where) for name in ("chosen_n_tokens", "rejected_n_tokens")})


def _check_target_mix(has_target: list[tuple[int, bool]], path: str | Path, what: str) -> None:
    """target_length on every row or on none: the loss cannot mix c(y) = |y| and | |y| - L |."""
    with_target = [line for line, has in has_target if has]
    if with_target and len(with_target) < len(has_target):
        line = next(line for line, has in has_target if not has)
        raise UserInputError(f"{path}:{line}: no 'target_length', but {len(with_target)} of {len(has_target)} "
                             f"{what} have one (line {with_target[0]}); set it on all or none")


def read_prompts(path: str | Path, *, uniform_target: bool = False,
                 reference_for: str | None = None) -> list[Prompt]:
    """Prompts of a JSONL file; ids are unique. uniform_target: target_length on all or none
    (training prompts, whose target lengths go into the loss). reference_for: every prompt
    needs a 'reference' answer, for the judge named here."""
    prompts, lines, first_line = [], [], {}
    for line_no, obj in iter_jsonl(path):
        prompt = prompt_from_row(obj, f"{path}:{line_no}", index=len(prompts))
        if reference_for and not (prompt.reference and prompt.reference.strip()):
            raise UserInputError(f"{path}:{line_no}: missing field 'reference' (the answer that {reference_for} "
                                 "compares with); add it to every prompt or choose another scoring.type")
        if prompt.id in first_line:
            raise UserInputError(f"{path}:{line_no}: duplicate prompt ids: '{prompt.id}' is already on line "
                                 f"{first_line[prompt.id]}; ids must be unique")
        first_line[prompt.id] = line_no
        prompts.append(prompt)
        lines.append(line_no)
    if not prompts:
        raise UserInputError(f"{path}: no prompts")
    if uniform_target:
        _check_target_mix([(n, p.target_length is not None) for n, p in zip(lines, prompts)], path, "prompts")
    return prompts


def read_pairs(path: str | Path, *, uniform_target: bool = False) -> list[PreferencePair]:
    """Pairs of a JSONL file. uniform_target: target_length on all or none (what training needs)."""
    pairs, lines = [], []
    for line_no, obj in iter_jsonl(path):
        pairs.append(pair_from_row(obj, f"{path}:{line_no}"))
        lines.append(line_no)
    if not pairs:
        raise UserInputError(f"{path}: no preference pairs")
    if uniform_target:
        _check_target_mix([(n, p.target_length is not None) for n, p in zip(lines, pairs)], path, "pairs")
    return pairs

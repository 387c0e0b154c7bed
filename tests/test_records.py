"""Records (ilrdpo.records): validated JSONL with `FILE:LINE: what is wrong` errors."""

from __future__ import annotations

import json

import pytest

from ilrdpo.errors import UserInputError
from ilrdpo.files import append_jsonl, read_jsonl_tolerant, write_jsonl
from ilrdpo.records import CandidateSet, PreferencePair, Prompt, read_pairs, read_prompts

GOOD = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}
ASSISTANT = [{"role": "assistant", "content": "A."}]


def write_lines(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def lines_of(*rows) -> list[str]:
    return [json.dumps(row) for row in rows]


@pytest.mark.parametrize("bad_line,message", [
    ('{"prompt": "Q?", "chosen": "A.", ', "invalid JSON"),
    ('["prompt", "chosen"]', "expected a JSON object"),
    (json.dumps({"prompt": "Q?", "chosen": "A."}), "missing field 'rejected'"),
    (json.dumps({"chosen": "A.", "rejected": "B."}), "missing field 'prompt'"),
    (json.dumps({**GOOD, "chosen": "   "}), "field 'chosen' is empty"),
    (json.dumps({**GOOD, "prompt": ""}), "field 'prompt' is empty"),
    (json.dumps({**GOOD, "chosen": 3}), "'chosen' must be a non-empty string or list of messages"),
    (json.dumps({**GOOD, "chosen": []}), "'chosen' must be a non-empty string or list of messages"),
    (json.dumps({**GOOD, "chosen": [{"role": "assistant"}]}), r"'chosen'\[0\] must be an object"),
    (json.dumps({**GOOD, "chosen_reward": "high"}), "field 'chosen_reward' has the wrong type"),
    (json.dumps({**GOOD, "margin": True}), "field 'margin' has the wrong type"),
    (json.dumps({**GOOD, "target_length": 12.5}), "field 'target_length' has the wrong type"),
    (json.dumps({**GOOD, "chosen": [{"role": "user", "content": "A."}]}),
     "'chosen' must end with an assistant message"),
    (json.dumps({**GOOD, "rejected": [{"role": "assistant", "content": " "}]}),
     "field 'rejected' has an empty answer"),
    (json.dumps({"chosen": [{"role": "user", "content": "Q1"}, *ASSISTANT],
                 "rejected": [{"role": "user", "content": "Q2"}, *ASSISTANT]}),
     "chosen and rejected do not share the same prompt messages"),
])
def test_bad_pair_line_is_reported_with_file_and_line(tmp_path, bad_line, message):
    """The third line is bad (line 2 is blank and still counts): FILE:3: message."""
    path = write_lines(tmp_path / "pairs.jsonl", json.dumps(GOOD), "", bad_line, json.dumps(GOOD))
    with pytest.raises(UserInputError, match=message) as info:
        read_pairs(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("bad_row,message", [
    ({"id": "a"}, "missing field 'prompt'"),
    ({"prompt": "  "}, "field 'prompt' is empty"),
    ({"prompt": "Q", "target_length": "long"}, "field 'target_length' has the wrong type"),
    ({"prompt": "Q", "reference": 7}, "field 'reference' has the wrong type"),
    ({"prompt": [{"role": "user"}]}, r"'prompt'\[0\] must be an object"),
])
def test_bad_prompt_line(tmp_path, bad_row, message):
    path = write_lines(tmp_path / "prompts.jsonl", *lines_of({"prompt": "ok"}, bad_row))
    with pytest.raises(UserInputError, match=message) as info:
        read_prompts(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserInputError, match="file not found"):
        read_pairs(tmp_path / "nope.jsonl")
    empty = write_lines(tmp_path / "empty.jsonl", "", "  ")
    with pytest.raises(UserInputError, match="no preference pairs"):
        read_pairs(empty)
    with pytest.raises(UserInputError, match="no prompts"):
        read_prompts(empty)


def test_duplicate_prompt_ids(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", *lines_of({"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}))
    with pytest.raises(UserInputError, match="duplicate prompt ids"):
        read_prompts(path)


def test_read_prompts_defaults(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", *lines_of(
        {"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}], "id": 7, "target_length": 20},
        {"prompt": "c", "reference": "C."}))
    prompts = read_prompts(path)
    assert prompts == [
        Prompt("a", id="0"),
        Prompt([{"role": "user", "content": "b"}], id="7", target_length=20),
        Prompt("c", id="2", reference="C."),
    ]


def test_read_pairs_formats(tmp_path):
    """Strings; message lists with a prompt field; implicit prompt (TRL); scores kept."""
    history = [{"role": "user", "content": "Q?"}]
    path = write_lines(tmp_path / "pairs.jsonl", *lines_of(
        {**GOOD, "chosen_reward": 1, "rejected_reward": 0.5, "margin": 0.5, "target_length": 30},
        {"prompt": history, "chosen": ASSISTANT, "rejected": [{"role": "assistant", "content": "B."}]},
        {"chosen": history + ASSISTANT, "rejected": history + [{"role": "assistant", "content": "B."}]},
    ))
    first, second, third = read_pairs(path)
    assert first == PreferencePair("Q?", "A.", "B.", chosen_reward=1, rejected_reward=0.5, margin=0.5,
                                   target_length=30)
    assert second == PreferencePair(history, "A.", "B.")
    assert third == PreferencePair(history, "A.", "B.")


def test_write_and_read_round_trip(tmp_path):
    pairs = [PreferencePair("Q?", "A.", "B.", chosen_reward=0.25), PreferencePair("Ü?", "é", "ß")]
    write_jsonl(tmp_path / "out" / "pairs.jsonl", pairs)
    assert read_pairs(tmp_path / "out" / "pairs.jsonl") == pairs
    assert not list((tmp_path / "out").glob(".*tmp"))  # the temp file was renamed away


def test_append_and_tolerant_read_drop_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    candidate = CandidateSet(prompt="Q", id="0", responses=["a", "bb"], n_tokens=[1, 2], truncated=[False, True])
    append_jsonl(path, {"step": 1})
    append_jsonl(path, candidate)
    with path.open("a") as handle:
        handle.write('{"step": 3, "lo')  # a writer killed mid-line
    rows = read_jsonl_tolerant(path)
    assert rows[0] == {"step": 1}
    assert CandidateSet(**rows[1]) == candidate
    assert len(rows) == 2
    assert read_jsonl_tolerant(tmp_path / "absent.jsonl") == []


def test_every_trl_layout_with_and_without_a_system_turn(tmp_path):
    """TRL DPOTrainer's layouts: explicit or implicit prompt, strings or messages, with a system turn."""
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}
    chosen, rejected = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "Red."}
    path = write_lines(tmp_path / "pairs.jsonl", *lines_of(
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Red."},
        {"chosen": "Sky colour? Blue.", "rejected": "Sky colour? Red."},  # implicit prompt, strings
        {"prompt": [system, user], "chosen": [chosen], "rejected": [rejected]},
        {"chosen": [system, user, chosen], "rejected": [system, user, rejected]},
        {"prompt": [user], "chosen": [chosen], "rejected": [rejected]},
    ))
    pairs = read_pairs(path)
    assert pairs[0] == PreferencePair("Sky colour?", "Blue.", "Red.")
    assert pairs[1] == PreferencePair("Sky colour?", " Blue.", " Red.")  # TRL's split: the space stays
    assert pairs[2] == pairs[3] == PreferencePair([system, user], "Blue.", "Red.")
    assert pairs[4] == PreferencePair([user], "Blue.", "Red.")


def test_implicit_string_pairs_without_a_shared_prompt_are_refused(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", *lines_of({"chosen": "Blue.", "rejected": "Red."}))
    with pytest.raises(UserInputError, match=r"pairs.jsonl:1: missing field 'prompt'"):
        read_pairs(path)


@pytest.mark.parametrize("indent", [None, 2], ids=["one line", "pretty-printed"])
def test_a_json_array_saved_as_jsonl_is_named_as_such(tmp_path, indent):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps([GOOD, GOOD], indent=indent) + "\n")
    with pytest.raises(UserInputError, match=r"this is a JSON array, and JSONL holds one object per line") as info:
        read_pairs(path)
    assert str(info.value).startswith(f"{path}:1: ") and "\n" not in str(info.value)

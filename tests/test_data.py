"""Data (ilrdpo.data): chat-template boundary, EOS, truncation, batching, loading pairs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from ilrdpo.data import (
    TokenizedPair,
    collate_pairs,
    collate_shared_prefix,
    count_tokens,
    encode_answer,
    encode_prompt,
    length_grouped_batches,
    load_pairs,
    padded_tokens,
    split_by_token_budget,
    tokenize_pairs,
    truncate,
)
from ilrdpo.errors import UserInputError
from ilrdpo.records import PreferencePair

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CONVERSATIONS = [
    ("What is 2+2?", "It is 4."),
    ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}], "Blue"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Say a number."}], " 42, then a newline\nand more: {x}"),
]


def template_ids(tokenizer, messages) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


# --- tokenisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,answer", CONVERSATIONS)
def test_prompt_plus_answer_is_the_chat_template_of_the_conversation(tokenizer, prompt, answer):
    """SmolLM2's template closes the assistant turn with <|im_end|> (the EOS) and then '\\n'.
    Our ids are the template's ids up to and including that EOS; only the '\\n' is left."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    full = template_ids(tokenizer, messages + [{"role": "assistant", "content": answer}])
    ours = encode_prompt(tokenizer, prompt) + encode_answer(tokenizer, answer)
    assert ours[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert full[:len(ours)] == ours
    assert tokenizer.decode(full[len(ours):]) == "\n"


def test_prompt_ends_with_the_generation_prompt(tokenizer):
    ids = encode_prompt(tokenizer, "Hello")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    with_system = encode_prompt(tokenizer, "Hello", system_prompt="Be terse.")
    assert tokenizer.decode(with_system).startswith("<|im_start|>system\nBe terse.<|im_end|>")


def test_prompt_without_chat_template(tokenizer):
    """use_chat_template=False: plain text ids; message lists become 'role: content' lines."""
    assert encode_prompt(tokenizer, "Hello there", use_chat_template=False) == \
        tokenizer("Hello there")["input_ids"]
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}], use_chat_template=False)
    assert tokenizer.decode(ids) == "user: Hi\nassistant: "


@pytest.mark.parametrize("answer", ["Tokyo.", "Tokyo.<|im_end|>", ""])
def test_eos_appended_exactly_once(tokenizer, answer):
    ids = encode_answer(tokenizer, answer)
    eos = tokenizer.eos_token_id
    assert ids[-1] == eos and ids.count(eos) == 1
    assert ids == tokenizer(answer.removesuffix("<|im_end|>"), add_special_tokens=False)["input_ids"] + [eos]


@pytest.mark.parametrize("prompt,answer", CONVERSATIONS)
def test_response_mask_covers_exactly_answer_and_eos(tokenizer, prompt, answer):
    pair = PreferencePair(prompt=prompt, chosen=answer, rejected="No idea, sorry.")
    example = tokenize_pairs(tokenizer, [pair], max_length=512)[0]
    batch = collate_pairs([example], tokenizer.pad_token_id)
    ids, attention, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    for row, text in ((0, answer), (1, "No idea, sorry.")):
        assert ids[row][response[row].bool()].tolist() == encode_answer(tokenizer, text)
        prompt_part = attention[row].bool() & ~response[row].bool()
        assert ids[row][prompt_part].tolist() == encode_prompt(tokenizer, prompt)
    assert batch["scored_tokens"].tolist() == [len(encode_answer(tokenizer, answer)),
                                          len(encode_answer(tokenizer, "No idea, sorry."))]


# --- truncation --------------------------------------------------------------------------------


def test_no_truncation_when_it_fits():
    prompt, chosen, rejected = list(range(10)), [100, 101], [200, 201, 202]
    assert truncate(prompt, chosen, rejected, max_length=13) == (prompt, chosen, rejected, False)


def test_truncation_keeps_prompt_end_and_answer_start():
    """Prompt 30 tokens, answers 10 and 25, max_length 32: the default prompt budget is
    32 // 2 = 16, so the prompt keeps its last 16 tokens (14..29); answers get 32 - 16 = 16:
    chosen (10) is whole, rejected keeps its first 16."""
    prompt, chosen, rejected = list(range(30)), list(range(100, 110)), list(range(200, 225))
    p, c, r, cut = truncate(prompt, chosen, rejected, max_length=32)
    assert cut
    assert p == list(range(14, 30)) and c == chosen and r == list(range(200, 216))
    assert len(p) + max(len(c), len(r)) == 32


def test_truncation_with_max_prompt_length():
    """max_prompt_length 8: the prompt keeps 22..29; answers get 32 - 8 = 24 tokens."""
    p, c, r, cut = truncate(list(range(30)), list(range(100, 110)), list(range(200, 240)), 32, 8)
    assert cut and p == list(range(22, 30)) and c == list(range(100, 110)) and r == list(range(200, 224))


def test_truncated_rows_always_fit_max_length():
    """Prompt 20, answers 5, max_length 16, max_prompt_length 32 (nothing forbids it in TrainSettings):
    every row must still fit 16 tokens and keep at least one answer token."""
    p, c, r, cut = truncate(list(range(20)), [1] * 5, [2] * 5, max_length=16, max_prompt_length=32)
    assert cut
    assert len(p) + len(c) <= 16 and len(p) + len(r) <= 16
    assert len(c) >= 1 and len(r) >= 1


def test_tokenize_pairs_flags_truncation(tokenizer):
    long_prompt = " ".join(["word"] * 200)
    pairs = [PreferencePair(prompt=long_prompt, chosen="Short.", rejected="Also short."),
             PreferencePair(prompt="Hi", chosen="Hello.", rejected="Hey.")]
    examples = tokenize_pairs(tokenizer, pairs, max_length=64)
    assert [e.truncated for e in examples] == [True, False]
    first = examples[0]
    assert len(first.prompt_ids) == 32
    assert first.prompt_ids == encode_prompt(tokenizer, long_prompt)[-32:]  # ends with the generation prompt
    assert first.chosen_ids == encode_answer(tokenizer, "Short.")
    # |y| is counted on the whole answer (before training truncation), EOS not counted
    assert (first.chosen_length, first.rejected_length) == (
        count_tokens(tokenizer, "Short."), count_tokens(tokenizer, "Also short."))
    assert first.chosen_ids == tokenizer("Short.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    in_chars = tokenize_pairs(tokenizer, pairs, max_length=64, length_unit="chars")[0]
    assert (in_chars.chosen_length, in_chars.rejected_length) == (len("Short."), len("Also short."))


def test_truncated_answers_get_no_eos(tokenizer):
    """An answer cut by max_new_tokens is trained as it was generated: without an EOS."""
    pair = PreferencePair(prompt="Hi", chosen="Hello there.", rejected="Hey you", rejected_truncated=True)
    (example,) = tokenize_pairs(tokenizer, [pair], max_length=64)
    assert example.chosen_ids[-1] == tokenizer.eos_token_id
    assert example.rejected_ids == tokenizer("Hey you", add_special_tokens=False)["input_ids"]
    assert example.rejected_length == count_tokens(tokenizer, "Hey you") == len(example.rejected_ids)


# --- batching ----------------------------------------------------------------------------------


def test_length_grouped_batches_partition_and_seed():
    lengths = [int(x) for x in torch.randint(1, 100, (23,), generator=torch.Generator().manual_seed(0))]
    batches = length_grouped_batches(lengths, batch_size=4, seed=7)
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert sorted(len(b) for b in batches) == [3] + [4] * 5
    # similar lengths together: batches do not interleave in length order
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in itertools.pairwise(spans))
    assert length_grouped_batches(lengths, 4, seed=7) == batches
    assert length_grouped_batches(lengths, 4, seed=8) != batches


def test_collate_pairs_shapes_and_masks():
    """Two pairs, pad id 0; rows [chosen 1, chosen 2, rejected 1, rejected 2], right padded to 6."""
    examples = [
        TokenizedPair(prompt_ids=[11, 12, 13], chosen_ids=[14, 15, 2], rejected_ids=[16, 2],
                      chosen_length=9, rejected_length=4),
        TokenizedPair(prompt_ids=[21], chosen_ids=[22, 2], rejected_ids=[23, 24, 25, 26, 2],
                      chosen_length=3, rejected_length=30),
    ]
    batch = collate_pairs(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 14, 15, 2],
        [21, 22, 2, 0, 0, 0],
        [11, 12, 13, 16, 2, 0],
        [21, 23, 24, 25, 26, 2],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [
        [0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    # lengths: each example's |y| as tokenize_pairs measured it; n_tokens: the scored tokens
    assert batch["lengths"].tolist() == [9, 3, 4, 30] and batch["scored_tokens"].tolist() == [3, 2, 2, 5]
    assert "target_length" not in batch


def test_collate_pairs_target_lengths():
    def pair(target):
        return TokenizedPair([1], [2], [3, 2], 1, 2, target_length=target)

    batch = collate_pairs([pair(10), pair(25.5)], pad_id=0)
    assert batch["target_length"].tolist() == [10.0, 25.5]
    assert "target_length" not in collate_pairs([pair(None), pair(None)], pad_id=0)



def test_collate_shared_prefix_rows_positions_and_predictors():
    """Two pairs, one row each: prompt | chosen | rejected, right padded to 8.

    Row 0: 11 12 13 | 14 15 2 | 16 2          positions 0 1 2 | 3 4 5 | 3 4
    Row 1: 21 | 22 2 | 23 24 25 2 | pad        positions 0 | 1 2 | 1 2 3 4 | 0
    Answer tokens in [chosen rows; rejected rows] order, as flat indices into the (2, 8) batch
    (row 1 starts at 8); each is predicted at the position before it, except an answer's first
    token, predicted at the prompt's last position (2 in row 0, 8 in row 1).
    """
    examples = [
        TokenizedPair([11, 12, 13], [14, 15, 2], [16, 2], 9, 4),
        TokenizedPair([21], [22, 2], [23, 24, 25, 2], 3, 30),
    ]
    batch = collate_shared_prefix(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15, 2, 16, 2], [21, 22, 2, 23, 24, 25, 2, 0]]
    assert batch["segments"].tolist() == [[1, 1, 1, 2, 2, 2, 3, 3], [1, 2, 2, 3, 3, 3, 3, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4], [0, 1, 2, 1, 2, 3, 4, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    #                                      chosen 0 | chosen 1 | rejected 0 | rejected 1
    assert batch["answer_position"].tolist() == [3, 4, 5, 9, 10, 6, 7, 11, 12, 13, 14]
    assert batch["predictor"].tolist() == [2, 3, 4, 8, 9, 2, 6, 8, 11, 12, 13]
    assert batch["answer_row"].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert batch["answer_index"].tolist() == [1, 2, 3, 1, 2, 1, 2, 1, 2, 3, 4]
    assert batch["lengths"].tolist() == [9, 3, 4, 30] and batch["scored_tokens"].tolist() == [3, 2, 2, 4]
    assert padded_tokens(examples, shared_prefix=True) == 2 * 8
    assert padded_tokens(examples, shared_prefix=False) == 4 * 6  # rows of 6, 3, 5, 5 tokens


def test_split_by_token_budget_by_hand():
    """Packed sizes 4, 6, 5, 9 positions; budget 12: sorted 4, 5, 6, 9 -> [4, 5] (2 x 5 = 10),
    then [6] (2 x 6 = 12 fits, 3 x 9 would not: [6, 9] is 2 x 9 = 18), then [9]."""
    examples = [TokenizedPair([1], [2] * a, [3] * b, a, b) for a, b in ((2, 1), (3, 2), (2, 2), (4, 4))]
    assert [padded_tokens([e], True) for e in examples] == [4, 6, 5, 9]
    assert split_by_token_budget(examples, [0, 1, 2, 3], True, 12) == [[0, 2], [1], [3]]
    assert split_by_token_budget(examples, [3, 1], True, 1) == [[1], [3]]  # over budget: alone

# --- loading -----------------------------------------------------------------------------------


def test_load_pairs_jsonl():
    pairs = load_pairs(str(EXAMPLES / "pairs.jsonl"))
    assert len(pairs) == 16
    assert pairs[0] == PreferencePair(
        prompt="What is the capital of Japan?", chosen="The capital of Japan is Tokyo.",
        rejected=pairs[0].rejected)
    assert pairs[0].rejected.startswith("Japan is a fascinating island nation")


def test_load_pairs_conversational_jsonl():
    pairs = load_pairs(str(EXAMPLES / "pairs_conversational.jsonl"))
    plain = load_pairs(str(EXAMPLES / "pairs.jsonl"))
    assert len(pairs) == 4
    assert pairs[0].prompt == [{"role": "user", "content": "What is the capital of Japan?"}]
    assert [(p.chosen, p.rejected) for p in pairs] == [(p.chosen, p.rejected) for p in plain[:4]]


def test_load_pairs_trl_implicit_prompt(tmp_path):
    """No 'prompt' field: the prompt is the history shared by chosen and rejected."""
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]
    row = {"chosen": history + [{"role": "assistant", "content": "Lima."}],
           "rejected": history + [{"role": "assistant", "content": "Peru is in South America..."}]}
    path = tmp_path / "implicit.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (pair,) = load_pairs(str(path))
    assert pair.prompt == history and pair.chosen == "Lima." and pair.rejected.startswith("Peru is")


ROWS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "It is Lyon, probably.",
     "chosen_reward": 0.9, "rejected_reward": 0.1},
    {"prompt": "2+2?", "chosen": "4", "rejected": "22", "chosen_reward": 1.0, "rejected_reward": 0.0},
]


def check_rows(pairs):
    assert [(p.prompt, p.chosen, p.rejected, p.chosen_reward) for p in pairs] == \
        [(r["prompt"], r["chosen"], r["rejected"], r["chosen_reward"]) for r in ROWS]


def test_load_pairs_parquet_and_json_files(tmp_path):
    from datasets import Dataset

    dataset = Dataset.from_list(ROWS)
    dataset.to_parquet(str(tmp_path / "pairs.parquet"))
    check_rows(load_pairs(str(tmp_path / "pairs.parquet")))
    (tmp_path / "pairs.json").write_text(json.dumps(ROWS))
    check_rows(load_pairs(str(tmp_path / "pairs.json")))
    assert len(load_pairs(f"{tmp_path / 'pairs.parquet'}:train[:1]")) == 1  # the slice data.max_examples was


def test_load_pairs_conversational_parquet(tmp_path):
    from datasets import Dataset

    rows = [json.loads(line) for line in (EXAMPLES / "pairs_conversational.jsonl").read_text().splitlines()]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "conv.parquet"))
    pairs = load_pairs(str(tmp_path / "conv.parquet"))
    assert pairs == load_pairs(str(EXAMPLES / "pairs_conversational.jsonl"))


def test_load_pairs_saved_dataset_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    check_rows(load_pairs(str(tmp_path / "single")))
    DatasetDict({"train": Dataset.from_list(ROWS[:1]), "test": Dataset.from_list(ROWS[1:])}).save_to_disk(
        str(tmp_path / "dict"))
    assert [p.chosen for p in load_pairs(f"{tmp_path / 'dict'}:test")] == ["4"]
    assert [p.chosen for p in load_pairs(str(tmp_path / "dict"))] == ["Paris."]


def test_load_pairs_bad_dataset_row_names_the_row(tmp_path):
    from datasets import Dataset

    Dataset.from_list([ROWS[0], {**ROWS[1], "chosen": "  "}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(UserInputError, match=r"bad\.parquet:row 1: field 'chosen' is empty"):
        load_pairs(str(tmp_path / "bad.parquet"))


def test_load_pairs_unloadable_source_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="cannot load preference data"):
        load_pairs(str(tmp_path / "no_such_folder"))


def test_load_pairs_missing_jsonl_says_file_not_found(tmp_path):
    missing = tmp_path / "typo.jsonl"
    with pytest.raises(UserInputError, match="file not found"):
        load_pairs(str(missing))


@pytest.mark.unit
@pytest.mark.parametrize("source,expected", [
    ("trl-lib/ultrafeedback_binarized", ("trl-lib/ultrafeedback_binarized", "train")),
    ("HuggingFaceH4/ultrafeedback_binarized:train_prefs", ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")),
    ("org/name:train[:100]", ("org/name", "train[:100]")),
    ("pairs.jsonl", ("pairs.jsonl", "train")),
    ("folder:", ("folder:", "train")),
])
def test_a_pairs_source_names_its_split_after_a_colon(source, expected):
    """data.pairs NAME:SPLIT (data.pairs_split went): the split of a hub dataset or saved folder."""
    from ilrdpo.data import dataset_split

    assert dataset_split(source) == expected

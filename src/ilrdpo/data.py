"""Prompt sets and preference data: loading, chat templates, tokenisation, batching.

The prompt goes through the chat template (with the generation prompt); each answer is
tokenised on its own and appended as ids, so the prompt/answer boundary is exactly what the
model sees at generation time. Re-tokenising prompt+answer as one string can merge tokens
across the boundary and shift the answer mask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ilrdpo.errors import UserInputError
from ilrdpo.records import PreferencePair, PromptText, pair_from_row, read_pairs

# --- loading -----------------------------------------------------------------------------------

DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def dataset_split(source: str) -> tuple[str, str]:
    """(dataset, split) of a data.pairs value: `NAME:SPLIT` names a split (a hub name or a saved
    dataset folder, e.g. HuggingFaceH4/ultrafeedback_binarized:train_prefs); default train."""
    folder, slash, last = source.rpartition("/")
    name, sep, split = last.partition(":")  # the split may hold a colon itself: train[:100]
    if sep and name and split and not Path(source).exists():
        return folder + slash + name, split
    return source, "train"


def load_pairs(source: str) -> list[PreferencePair]:
    """Preference pairs from a JSONL file, a saved dataset folder, a data file, or a hub name
    (with a split: dataset_split)."""
    source, split = dataset_split(source)
    path = Path(source)
    if path.suffix == ".jsonl" or (path.suffix in DATASET_SUFFIXES and not path.exists()):
        if path.suffix != ".jsonl":
            raise UserInputError(f"{path}: file not found")
        return read_pairs(path)
    import datasets  # slow import; only for non-JSONL sources

    try:
        if path.is_dir() and (path / "dataset_info.json").exists():
            dataset = datasets.load_from_disk(str(path))
            dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
        elif path.is_file() and path.suffix in DATASET_SUFFIXES:
            dataset = datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split=split)
        else:  # a folder of data files, or a hub name
            dataset = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        raise UserInputError(f"{source}: cannot load preference data ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None
    pairs = []
    for index, row in enumerate(dataset):
        pairs.append(pair_from_row(dict(row), f"{source}:row {index}"))
    if not pairs:
        raise UserInputError(f"{source}: no preference pairs")
    return pairs


# --- tokenisation ------------------------------------------------------------------------------


def as_messages(prompt: PromptText, system_prompt: str | None = None) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    return prompt


def encode_prompt(tokenizer, prompt: PromptText, use_chat_template: bool = True,
                  system_prompt: str | None = None) -> list[int]:
    """Prompt ids: the chat template with the generation prompt when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            as_messages(prompt, system_prompt), add_generation_prompt=True, tokenize=True
        )
        # transformers >= 5 returns a BatchEncoding, older versions a list of ids.
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    if not isinstance(prompt, str):
        text = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        return tokenizer(text + "\nassistant: ", add_special_tokens=True)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def count_tokens(tokenizer, answer: str) -> int:
    """|y| in tokens of a text from outside (a pairs file): its tokens, EOS not counted. A sampled
    answer's length is the tokens generated (generation.Sample.n_tokens), kept with it."""
    return len(tokenizer(answer, add_special_tokens=False)["input_ids"])


def pair_lengths(tokenizer, pair: PreferencePair, unit: str,
                 counted: tuple[int, int] | None = None) -> tuple[int, int]:
    """(|y_w|, |y_l|) in the length margin's unit: in tokens, the tokens generated when the pair
    carries them (made from sampled candidates), else the text's tokenisation (pairs from outside):
    `counted`, when the caller has already tokenised both answers, else count_tokens."""
    def length(text: str, generated: int | None, side: int) -> int:
        n = generated if generated is not None else counted[side] if counted else count_tokens(tokenizer, text)
        return answer_length(n, text, unit)

    return length(pair.chosen, pair.chosen_n_tokens, 0), length(pair.rejected, pair.rejected_n_tokens, 1)


def answer_length(n_tokens: int, text: str, unit: str) -> int:
    """|y| in the length margin's unit: count_tokens(...) for "tokens", characters for "chars"."""
    return len(text) if unit == "chars" else n_tokens


def encode_answer(tokenizer, answer: str, truncated: bool = False) -> list[int]:
    """Answer ids followed by exactly one EOS, unless the answer was cut by max_new_tokens:
    appending one would teach the model to stop where it was cut."""
    return encode_answer_counted(tokenizer, answer, truncated)[0]


def encode_answer_counted(tokenizer, answer: str, truncated: bool = False) -> tuple[list[int], int]:
    """(encode_answer(...), count_tokens(answer)), the answer tokenised once for both."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    n_tokens = len(ids)
    eos = tokenizer.eos_token_id
    if not truncated and eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids, n_tokens


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_length: int  # |y_w| in the loss's unit (answer_length), before any truncation
    rejected_length: int
    target_length: float | None = None
    truncated: bool = False  # cut to max_length for training

    @property
    def row_tokens(self) -> int:
        """Real tokens of both rows (prompt counted twice): the throughput unit."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             max_prompt_length: int | None = None) -> tuple[list[int], list[int], list[int], bool]:
    """Keep the end of the prompt and the start of each answer so each row fits max_length."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected, False
    # At least one answer token must survive, or the pair carries no signal.
    keep_prompt = min(max_prompt_length or max_length // 2, max_length - 1)
    if len(prompt) > keep_prompt:
        prompt = prompt[-keep_prompt:]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def tokenize_pairs(tokenizer, pairs: list[PreferencePair], *, max_length: int,
                   max_prompt_length: int | None = None, use_chat_template: bool = True,
                   system_prompt: str | None = None, length_unit: str = "tokens") -> list[TokenizedPair]:
    with_target = sum(p.target_length is not None for p in pairs)
    if 0 < with_target < len(pairs):
        raise UserInputError(f"target_length is set on {with_target} of {len(pairs)} pairs; set it on all or none")
    out = []
    for pair in pairs:
        prompt = encode_prompt(tokenizer, pair.prompt, use_chat_template, system_prompt)
        chosen, n_chosen = encode_answer_counted(tokenizer, pair.chosen, pair.chosen_truncated)
        rejected, n_rejected = encode_answer_counted(tokenizer, pair.rejected, pair.rejected_truncated)
        lengths = pair_lengths(tokenizer, pair, length_unit, counted=(n_chosen, n_rejected))
        prompt, chosen, rejected, cut = truncate(prompt, chosen, rejected, max_length, max_prompt_length)
        out.append(TokenizedPair(prompt, chosen, rejected, *lengths, pair.target_length, cut))
    return out


# --- batching ----------------------------------------------------------------------------------


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar length (little padding), in a seeded random order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def collate_pairs(examples: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of [chosen rows; rejected rows] so both go through one forward."""
    rows = [e.prompt_ids + e.chosen_ids for e in examples] + [e.prompt_ids + e.rejected_ids for e in examples]
    answer_lens = [len(e.chosen_ids) for e in examples] + [len(e.rejected_ids) for e in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, n_answer) in enumerate(zip(rows, answer_lens)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        response_mask[i, len(row) - n_answer:len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
    return {**batch, **_pair_fields(examples)}


def _pair_fields(examples: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    """What the loss needs besides log-probs, in [chosen; rejected] order."""
    lengths = [e.chosen_length for e in examples] + [e.rejected_length for e in examples]
    answer_lens = [len(e.chosen_ids) for e in examples] + [len(e.rejected_ids) for e in examples]
    targets = [e.target_length for e in examples]  # all set or none (checked in tokenize_pairs)
    fields = {
        "lengths": torch.tensor(lengths, dtype=torch.float32),  # (2B,) |y| for the length margin
        "scored_tokens": torch.tensor(answer_lens, dtype=torch.float32),  # (2B,) answer tokens scored, EOS included
    }
    if targets[0] is not None:
        fields["target_length"] = torch.tensor(targets, dtype=torch.float32)  # (B,)
    return fields


def _unit_width(e: TokenizedPair) -> int:
    return len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)


def collate_shared_prefix(examples: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of prompt + chosen + rejected, for logprobs.shared_prefix_logps: the
    prompt is computed once for both answers, one row per pair. Positions restart after the prompt, so the rejected
    answer sits where it sits in its own row; segments (0 pad, 1 prompt, 2 chosen, 3 rejected) give
    the attention mask. Each answer token t is predicted at position t - 1, except a first answer
    token, predicted at the prompt's last position. The flat indices below (into the (R, T)
    row-major batch) list the answer tokens in the order [chosen rows; rejected rows]; answer_row
    is the output row (chosen i -> i, rejected i -> P + i).
    """
    widths = [_unit_width(e) for e in examples]
    width, n = max(widths), len(examples)
    rows = [[i] for i in range(n)]
    place = {i: (i, 0) for i in range(n)}  # pair -> (row, first column)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # real tokens (for counting)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    predictor, answer_position, answer_row, answer_index = [], [], [], []
    for side, key in enumerate(("chosen_ids", "rejected_ids")):
        for i, e in enumerate(examples):
            r, offset = place[i]
            n_prompt, n_chosen = len(e.prompt_ids), len(e.chosen_ids)
            start = r * width + offset + n_prompt + (n_chosen if side else 0)  # flat index of the answer
            answer = getattr(e, key)
            for k in range(len(answer)):  # without a prompt the first token has no predictor
                if k or n_prompt:
                    answer_position.append(start + k)
                    predictor.append(start + k - 1 if k else r * width + offset + n_prompt - 1)
                    answer_row.append(side * n + i)
                    answer_index.append(k + 1)
    for i, e in enumerate(examples):
        r, offset = place[i]
        row = e.prompt_ids + e.chosen_ids + e.rejected_ids
        n_prompt, n_chosen, n_rejected = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        span = slice(offset, offset + len(row))
        input_ids[r, span] = torch.tensor(row)
        attention_mask[r, span] = 1
        segments[r, span] = torch.tensor([1] * n_prompt + [2] * n_chosen + [3] * n_rejected)
        position_ids[r, span] = torch.tensor(
            list(range(n_prompt + n_chosen)) + list(range(n_prompt, n_prompt + n_rejected)))
    batch = {
        "input_ids": input_ids, "attention_mask": attention_mask, "segments": segments,
        "position_ids": position_ids,
        "predictor": torch.tensor(predictor, dtype=torch.long),  # (N,)
        "answer_position": torch.tensor(answer_position, dtype=torch.long),  # (N,)
        "answer_row": torch.tensor(answer_row, dtype=torch.long),  # (N,)
        "answer_index": torch.tensor(answer_index, dtype=torch.long),  # (N,) 1-based, for LD-DPO
    }
    return {**batch, **_pair_fields(examples)}


def padded_tokens(examples: list[TokenizedPair], shared_prefix: bool) -> int:
    """Positions (padding included) of the batch the collate function builds for `examples`."""
    if shared_prefix:
        return len(examples) * max(_unit_width(e) for e in examples)
    return 2 * len(examples) * max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids))
                                   for e in examples)


def split_by_token_budget(examples: list[TokenizedPair], indices: list[int], shared_prefix: bool,
                          budget: int) -> list[list[int]]:
    """The pairs `indices` in micro-batches whose padded size stays within `budget` positions:
    sorted by length (little padding), filled greedily; a pair larger than the budget alone."""
    order = sorted(indices, key=lambda i: padded_tokens([examples[i]], shared_prefix))
    batches: list[list[int]] = []
    for i in order:
        if batches and padded_tokens([examples[j] for j in batches[-1] + [i]], shared_prefix) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches

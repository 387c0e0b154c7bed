"""Reference log-probs taken while sampling (issue 31).

In round t the sampler is pi_{t-1}, which is also the round's reference (iterations.reference
previous), so the log-prob of every sampled answer under the reference is known when it is drawn.
The generate stage keeps it with the answer's token ids (iter_t/sample_logps.jsonl); the train
stage takes a pair's reference log-probs from there when both answers re-tokenise to exactly the
ids that were sampled and the prompt to the ids it was sampled from (nothing cut by
train.max_length), and runs the reference forward pass only for the other pairs. The two agree to
float tolerance (tests/test_sampled_reference.py); the forward pass they replace is about a
quarter of a round's training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ilrdpo.config import DataSettings, LossSettings, TrainSettings
from ilrdpo.data import tokenize_pairs
from ilrdpo.files import write_jsonl
from ilrdpo.records import PreferencePair, Prompt
from ilrdpo.train import reference_logps


def _key(prompt, response: str) -> str:
    return json.dumps([prompt, response], ensure_ascii=False)


def write_sample_logps(path: Path, prompts: list[Prompt], samples: dict) -> bool:
    """iter_t/sample_logps.jsonl: per prompt, each answer's prompt ids, token ids and log-prob;
    False (nothing written) when the samples carry none (a backend that cannot keep them)."""
    if any(getattr(s, "logp", None) is None for p in prompts for s in samples[p.id]):
        return False
    write_jsonl(path, [{"id": p.id, "prompt": p.prompt,
                        "answers": [{"response": s.text, "prompt_ids": s.prompt_ids, "token_ids": s.token_ids,
                                     "logp": s.logp} for s in samples[p.id]]} for p in prompts])
    return True


def read_sample_logps(path: Path) -> dict[str, dict]:
    """{(prompt, response) key: the answer's record} of sample_logps.jsonl; {} when there is none."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_key(row["prompt"], a["response"]): a for row in rows for a in row["answers"]}


def sampled_reference_logps(model, tokenizer, pairs: list[PreferencePair], sampled: dict[str, dict],
                            loss: LossSettings, train: TrainSettings, data: DataSettings,
                            compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """((P, 2) reference log-probs [chosen, rejected], pairs forwarded): from `sampled`
    (read_sample_logps, taken with `model` while sampling) where a pair's prompt and both answers
    tokenise as train_round tokenises them to the sampled ids; the rest by a forward pass of `model`."""
    examples = tokenize_pairs(tokenizer, pairs, max_length=train.max_length,
                              use_chat_template=data.use_chat_template, system_prompt=data.system_prompt,
                              length_unit=loss.length_unit)
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    missing = []
    for i, (pair, example) in enumerate(zip(pairs, examples)):
        found = [sampled.get(_key(pair.prompt, text)) for text in (pair.chosen, pair.rejected)]
        if all(a is not None and a["prompt_ids"] == example.prompt_ids and a["token_ids"] == ids
               for a, ids in zip(found, (example.chosen_ids, example.rejected_ids))):
            out[i] = torch.tensor([found[0]["logp"], found[1]["logp"]])
        else:
            missing.append(i)
    if missing:
        forwarded = reference_logps(model, [examples[i] for i in missing], tokenizer.pad_token_id, loss, train,
                                    compute_dtype=compute_dtype)  # (M, 2)
        out[missing] = forwarded
    return out, len(missing)

"""An LLM judge over chat completions, in AlpacaEval's pairwise protocol.

For each prompt the judge model sees the instruction and two outputs labelled "m" and "M" and is
asked to answer with the label of the better one (one token). The preference for the model's
answer over the baseline's is read from the label tokens' log-probabilities where the server
returns them (`logprobs: true, top_logprobs: 5`: p = P(label of the model's answer) / (P(m) +
P(M)), AlpacaEval 2.0's weighted annotator), else parsed from the text ("m" or "M"; anything
else is unparseable: counted, and left out of the win rate). The order of the two outputs is
randomised per prompt (seeded by the prompt id and the seed), or both orders are asked and their
preferences averaged (order="both").

Every annotation is cached in a JSONL file (the run directory's) keyed by the SHA-256 of the exact
request body, so a rerun or a report asks the server nothing it was asked before. The preferences
go to ilrdpo.evaluation.winrate.win_rates (raw and length-controlled) as any judge's do.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilrdpo.files import append_jsonl, read_jsonl_tolerant
from ilrdpo.records import Prompt
from ilrdpo.serving.client import Client, ServerError

SYSTEM = ("You are a careful assistant that compares the answers of two large language models to the same "
          "instruction and selects the better one, as a human expert would. Your choice ranks the models.")
USER = """Here is an instruction and the outputs of two models, each with its model identifier.

## Instruction

{instruction}

## Outputs

{{"model_identifier": "m", "output": {first}}}

{{"model_identifier": "M", "output": {second}}}

## Task

Which model gave the better output, judged by accuracy, helpfulness and relevance to the instruction? \
Answer with the model identifier alone, m or M, and nothing else."""
LABELS = ("m", "M")


@dataclass
class Judgement:
    preferences: list[float | None]  # per prompt: the model's answer preferred with this probability; None: unparseable
    unparseable: int


def pairwise_messages(instruction: str, first: str, second: str) -> list[dict[str, str]]:
    user = USER.format(instruction=instruction, first=json.dumps(first), second=json.dumps(second))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def label_probability(answer: Any) -> float | None:
    """P("M") / (P("m") + P("M")) of the first answer token (log-probs), else of its text; None if neither tells."""
    try:
        choice = answer["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"the answer holds no choices ({str(answer)[:120]})") from None
    content = ((choice.get("logprobs") or {}).get("content") or [None])[0] if isinstance(choice, dict) else None
    if isinstance(content, dict):
        weights = {label: 0.0 for label in LABELS}
        for entry in content.get("top_logprobs") or [content]:
            token = str(entry.get("token", "")).strip()
            if token in weights and isinstance(entry.get("logprob"), (int, float)):
                weights[token] += math.exp(entry["logprob"])
        if sum(weights.values()) > 0:
            return weights["M"] / (weights["m"] + weights["M"])
    text = str((choice.get("message") or {}).get("content") or "").strip().strip("'\"`*. ")
    return {"m": 0.0, "M": 1.0}.get(text)


class PairwiseJudge:
    def __init__(self, client: Client, model: str | None, cache: Path, order: str = "random",
                 concurrency: int = 8) -> None:
        if order not in ("random", "both"):
            raise ValueError(f"order must be 'random' or 'both', not {order!r}")
        self.client, self.model, self.cache_path, self.order = client, model, Path(cache), order
        self.concurrency = concurrency
        self.cache = {row["key"]: row for row in read_jsonl_tolerant(self.cache_path)} \
            if self.cache_path.exists() else {}
        self.asked = 0  # requests sent (not answered from the cache)
        self.lock = threading.Lock()  # the cache file is appended to by the request threads

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                                "top_logprobs": 5}
        return {"model": self.model, **body} if self.model else body

    def _ask(self, body: dict[str, Any]) -> float | None:
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if key in self.cache:
            return self.cache[key]["p_second"]
        answer = self.client.post("/v1/chat/completions", body)
        try:
            row = {"key": key, "p_second": label_probability(answer)}
        except ValueError as error:
            raise ServerError(f"{self.client.what} {self.client.url}/v1/chat/completions: {error}") from None
        with self.lock:
            self.cache[key] = row
            self.asked += 1
            append_jsonl(self.cache_path, row)
        return row["p_second"]

    def orders(self, prompt: Prompt, seed: int) -> list[bool]:
        """Whether the model's answer goes second (label M), per request for this prompt."""
        if self.order == "both":
            return [False, True]
        digest = hashlib.sha256(f"{seed}\0{prompt.id}".encode()).digest()
        return [bool(digest[0] & 1)]

    def preference(self, prompt: Prompt, answer: str, baseline: str, seed: int) -> float | None:
        instruction = prompt.prompt if isinstance(prompt.prompt, str) else \
            "\n".join(f"{m['role']}: {m['content']}" for m in prompt.prompt)
        values = []
        for second in self.orders(prompt, seed):
            pair = (baseline, answer) if second else (answer, baseline)
            p = self._ask(self.body(pairwise_messages(instruction, *pair)))
            if p is None:
                return None
            values.append(p if second else 1.0 - p)
        return sum(values) / len(values)

    def judge(self, prompts: list[Prompt], answers: list[str], baselines: list[str], seed: int = 0) -> Judgement:
        """The model's answers against the baseline's, prompt by prompt (requests in parallel)."""
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            prefs = list(pool.map(lambda args: self.preference(*args, seed), zip(prompts, answers, baselines)))
        return Judgement(prefs, sum(p is None for p in prefs))


def build_pairwise_judge(settings, cache: Path) -> PairwiseJudge:
    """eval.judge's LLM judge: settings.url (the chat server), settings.model (the name requests
    carry); annotations cached in `cache`."""
    client = Client(settings.url, what="eval.judge.url")
    return PairwiseJudge(client, settings.model, cache)


def win_rates_from(result: Judgement, model_lengths: list[int], baseline_lengths: list[int], seed: int = 0) -> dict:
    """Raw and LC win rates over the parsed judgements (evaluation.winrate.win_rates), plus
    `judged` and `unparseable` counts."""
    from ilrdpo.evaluation.winrate import win_rates

    kept = [i for i, p in enumerate(result.preferences) if p is not None]
    counts = {"judged": len(kept), "unparseable": result.unparseable}
    if not kept:
        return counts
    return {**win_rates([result.preferences[i] for i in kept], [model_lengths[i] for i in kept],
                        [baseline_lengths[i] for i in kept], seed=seed), **counts}

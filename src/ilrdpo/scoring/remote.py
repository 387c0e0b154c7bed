"""A reward model behind an HTTP endpoint (scoring.type: remote).

Request, one per batch of scoring.batch_size answers (POST scoring.url):

    {"model": scoring.model, "input": [text, ...]}

each text the (prompt, answer) conversation rendered with the reward model's own chat template
(its tokenizer, loaded from scoring.model; prompt, newline, answer where it has none), as
scoring.type reward_model renders it in-process. That is vLLM's request for a pooling model
(`vllm serve MODEL --runner pooling`, endpoint /pooling, or /classify). Responses read, one score
per input in input order (`index` where given):

    {"data": [{"index": 0, "data": [2.31]}, ...]}          vLLM /pooling (a reward model's one logit)
    {"data": [{"index": 0, "probs": [0.91]}, ...]}         vLLM /classify (the first label's probability)
    {"scores": [2.31, ...]}                                a scorer of your own

A wrong count, a non-number, NaN or infinity, malformed JSON, a timeout or an error status after
the client's retries is one line naming the URL. The API key ($OPENAI_API_KEY, ilrdpo.serving.client)
is sent as a bearer token and never written.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from ilrdpo.config import ScoringSettings
from ilrdpo.errors import UserInputError
from ilrdpo.records import Prompt
from ilrdpo.scoring.reward_model import conversation_text
from ilrdpo.serving.client import REQUEST_TIMEOUT_S, Client, ServerError


class RemoteScorer:
    def __init__(self, settings: ScoringSettings, key: str = "scoring", timeout: float = REQUEST_TIMEOUT_S) -> None:
        if not settings.url:
            raise UserInputError(f"config key '{key}.url' is required for {key}.type remote")
        parts = urllib.parse.urlsplit(settings.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserInputError(f"config key '{key}.url': '{settings.url}' is not an http(s) URL")
        self.path = parts.path or "/pooling"
        self.client = Client(f"{parts.scheme}://{parts.netloc}", timeout, what=f"{key}.url")
        self.model = settings.model
        self.tokenizer = _tokenizer(settings.model, key) if settings.model else None
        self.name = f"remote scorer {settings.url}"

    def text(self, prompt: Prompt, response: str) -> str:
        if self.tokenizer is not None:
            return conversation_text(self.tokenizer, prompt, response)
        text = prompt.prompt if isinstance(prompt.prompt, str) else "\n".join(m["content"] for m in prompt.prompt)
        return f"{text}\n{response}"

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        body: dict[str, Any] = {"input": [self.text(p, r) for p, r in zip(prompts, responses)]}
        if self.model:
            body["model"] = self.model
        answer = self.client.post(self.path, body)
        return read_scores(answer, f"{self.client.what} {self.client.url}{self.path}")


def read_scores(answer: Any, where: str) -> list[float]:
    """Scores in input order from any of the response shapes above; a malformed one is one line."""
    if isinstance(answer, dict) and isinstance(answer.get("scores"), list):
        return [_number(s, where) for s in answer["scores"]]
    rows = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ServerError(f"{where}: expected 'data' (vLLM pooling or classify) or 'scores' in the answer "
                          f"({str(answer)[:120]})")
    rows = sorted(rows, key=lambda r: r.get("index", 0))
    return [_number(_first(r.get("data", r.get("probs"))), where) for r in rows]


def _first(value: Any) -> Any:
    while isinstance(value, list) and value:
        value = value[0]
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ServerError(f"{where}: a score is not a number ({str(value)[:60]})")
    return float(value)


def _tokenizer(model: str, key: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise UserInputError(f"config key '{key}.model': cannot load the tokenizer of '{model}' "
                             f"({str(error).splitlines()[0]})") from None

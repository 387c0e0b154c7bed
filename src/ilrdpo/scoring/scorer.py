"""Scorers: one Protocol, `score(prompts, responses) -> list[float]`, picked by scoring.type.

- reward_model: an AutoModelForSequenceClassification reward model;
- embedding_similarity: cosine similarity to the prompt's reference answer;
- prompt_similarity: cosine similarity to the prompt (a document, a conversation's last user turn);
- python: a user function named in the config (and only then imported and run);
- remote: a reward model behind an HTTP endpoint (vLLM's pooling API: scoring/remote.py).

The reward the pipeline optimises is the scorer's value; a scorer that also has
`length_bonus(n_tokens) -> list[float]` (the demo's judge, which simulates a verbosity bias) has
that added (shaped_rewards), and the scorer's own value is kept apart as the quality.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ilrdpo.config import ScoringSettings
from ilrdpo.errors import UserInputError
from ilrdpo.records import Prompt


class Scorer(Protocol):
    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]: ...


def _reward_model(settings: ScoringSettings, device: torch.device) -> Scorer:
    from ilrdpo.scoring.reward_model import RewardModelScorer

    return RewardModelScorer(settings, device)


def _embedding(settings: ScoringSettings, device: torch.device) -> Scorer:
    from ilrdpo.scoring.embedding import EmbeddingScorer

    return EmbeddingScorer(settings, device)


def _python(settings: ScoringSettings, device: torch.device) -> Scorer:
    from ilrdpo.scoring.python_fn import PythonScorer

    return PythonScorer(settings)


def _remote(settings: ScoringSettings, device: torch.device) -> Scorer:
    from ilrdpo.scoring.remote import RemoteScorer

    return RemoteScorer(settings)


SCORERS = {"reward_model": _reward_model, "embedding_similarity": _embedding, "prompt_similarity": _embedding,
           "python": _python, "remote": _remote}


def build_scorer(settings: ScoringSettings, device: torch.device | None = None) -> Scorer:
    if settings.type == "reward_model" and settings.model is None:
        raise UserInputError("scoring.model is required for scoring.type=reward_model")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return SCORERS[settings.type](settings, device)


def shaped_rewards(quality: list[float], n_tokens: list[int], scorer: Scorer) -> list[float]:
    """The reward the pipeline optimises: the scorer's value, plus scorer.length_bonus(n_tokens)
    where the scorer has one."""
    bonus = getattr(scorer, "length_bonus", None)
    if bonus is None:
        return list(quality)
    return [q + b for q, b in zip(quality, bonus(n_tokens))]


def score_in_batches(scorer: Scorer, prompts: list[Prompt], responses: list[str], batch_size: int) -> list[float]:
    """Scores of every (prompt, answer); a NaN or infinite score is an error naming the scorer,
    the prompt and the answer's index among that prompt's answers (it would poison pairing)."""
    scores: list[float] = []
    for start in range(0, len(responses), batch_size):
        chunk = scorer.score(prompts[start:start + batch_size], responses[start:start + batch_size])
        if len(chunk) != len(responses[start:start + batch_size]):
            raise UserInputError(f"scorer returned {len(chunk)} scores for "
                                 f"{len(responses[start:start + batch_size])} answers")
        scores.extend(float(s) for s in chunk)
    for position, score in enumerate(scores):
        if not math.isfinite(score):
            prompt_id = prompts[position].id
            answer_index = sum(p.id == prompt_id for p in prompts[:position])
            name = getattr(scorer, "name", type(scorer).__name__)
            raise UserInputError(f"{name} gave {score} for prompt '{prompt_id}', answer {answer_index}; "
                                 "scores must be finite numbers")
    return scores


def judge_record(settings: ScoringSettings) -> dict:
    """The judge as result files record it: its settings, with the model it actually loads (the
    embedding judge's default filled in) and a name a reader recognises."""
    from ilrdpo.scoring.embedding import DEFAULT_MODEL

    record = settings.model_dump()
    if settings.type in ("embedding_similarity", "prompt_similarity"):
        record["model"] = settings.model or DEFAULT_MODEL
    record["name"] = settings.function if settings.type == "python" else f"{settings.type} '{record['model']}'"
    return record

"""Per-round decisions that several commands take, each in one pure function (alpha: ilrdpo.alpha).

- stage_seed: the random seed of each stage of round t, from the run's seed;
- judge_tie_tolerance: the reward difference within which two judged answers tie, read by the
  evaluate stage and by `ilrdpo report`'s refit of the win rates alike.

Imports nothing of the project: the bottom layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Offset of the sampled eval answers (experimental.eval_samples) from the run's seed: their draws differ from
# the training samples'.
SAMPLED_EVAL_OFFSET = 7919


def stage_seed(seed: int, t: int, stage: str) -> int:
    """The seed of `stage` in round t (t = 0: the initial model's evaluation, or `ilrdpo train`'s one
    round). Sampling draws from seed + 1000 t, pairing and training from seed + t; eval answers use
    the run's seed in every round, so each iterate answers under the same random stream."""
    offsets = {"generate": 1000 * t, "pair": t, "train": t, "eval": 0, "eval_samples": SAMPLED_EVAL_OFFSET}
    return seed + offsets[stage]


def judge_tie_tolerance(judge: Mapping[str, Any] | None, scoring: Mapping[str, Any] | None) -> float:
    """Judged rewards within this of each other are a tie (half a win): scoring.tie_tolerance
    (sections as dumped: config.yaml, or model_dump()). A run recorded while the judge had a
    tie_tolerance of its own (eval.judge.tie_tolerance, removed) keeps the one it was judged with."""
    recorded = (judge or {}).get("tie_tolerance")
    return float(recorded if recorded is not None else (scoring or {}).get("tie_tolerance") or 0.0)

"""Scoring functions in the form a user writes them, for scoring.type=python.

Named in a config as "tests/helpers/scorer.py:char_count" (a file) or "helpers.scorer:char_count"
(a module, with tests/ on sys.path).
"""

from __future__ import annotations

NOT_A_FUNCTION = 3


def char_count(prompts, responses):
    """Longer text scores higher: one distinct, deterministic value per answer (few ties)."""
    return [float(len(r)) for r in responses]


def one_short(prompts, responses):
    """A broken scorer: one score fewer than answers."""
    return [0.0] * (len(responses) - 1)


def fails_on_training_prompts(prompts, completions, id, **kwargs):
    """char_count for the eval prompts (ids 'e...'), an error for the training prompts (ids 't...'):
    stops a run right after iteration 1's generation. TRL's form: the prompts file's id column
    arrives as a keyword list."""
    if any(i.startswith("t") for i in id):
        raise RuntimeError("scorer unavailable for training prompts")
    return char_count(prompts, completions)

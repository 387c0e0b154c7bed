"""Turn the scored N answers of each prompt into (chosen, rejected) pairs.

Strategies (pairing.strategy): best_worst (the iLR-DPO default), best_random (best against a
seeded random lower-scored answer), all (every ordered pair).
Pairs with identical texts or tied rewards (within scoring.tie_tolerance) carry no preference and are dropped; empty answers
never enter a pair; answers cut by max_new_tokens are left out when pairing.skip_truncated is on
(and otherwise trained without an EOS).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ilrdpo.config import PairingSettings
from ilrdpo.records import CandidateSet, PreferencePair

IndexPairs = list[tuple[int, int]]


def _best_worst(keys: list[float], eligible: list[int], rng: random.Random) -> IndexPairs:
    best = max(eligible, key=lambda i: keys[i])
    worst = min(eligible, key=lambda i: keys[i])
    return [(best, worst)]


def _best_random(keys: list[float], eligible: list[int], rng: random.Random) -> IndexPairs:
    best = max(eligible, key=lambda i: keys[i])
    lower = [i for i in eligible if keys[i] < keys[best]]
    return [(best, rng.choice(lower))] if lower else []


def _all(keys: list[float], eligible: list[int], rng: random.Random) -> IndexPairs:
    return [(i, j) for i in eligible for j in eligible if keys[i] > keys[j]]


STRATEGIES: dict[str, Callable[[list[float], list[int], random.Random], IndexPairs]] = {
    "best_worst": _best_worst,
    "best_random": _best_random,
    "all": _all,
}


def make_pairs(candidates: CandidateSet, settings: PairingSettings, *, seed: int = 0,
               tie_tolerance: float = 0.0) -> list[PreferencePair]:
    """The pairs of one prompt's scored answers; reward differences within tie_tolerance are ties
    and make no pair."""
    keys = candidates.rewards
    # An empty answer (EOS first) is never trained on: it is not text a judge has read.
    eligible = [i for i in range(len(candidates.responses)) if candidates.responses[i].strip()
                and not (settings.skip_truncated and candidates.truncated[i])]
    if len(eligible) < 2:
        return []
    rng = random.Random(f"{seed}:{candidates.id}")
    pairs = []
    for chosen, rejected in STRATEGIES[settings.strategy](keys, eligible, rng):
        margin = keys[chosen] - keys[rejected]
        if candidates.responses[chosen] == candidates.responses[rejected]:
            continue
        if margin <= tie_tolerance:
            continue
        pairs.append(PreferencePair(
            prompt=candidates.prompt, chosen=candidates.responses[chosen],
            rejected=candidates.responses[rejected], chosen_reward=candidates.rewards[chosen],
            rejected_reward=candidates.rewards[rejected], margin=margin,
            target_length=candidates.target_length, chosen_truncated=candidates.truncated[chosen],
            rejected_truncated=candidates.truncated[rejected],
            chosen_n_tokens=candidates.n_tokens[chosen], rejected_n_tokens=candidates.n_tokens[rejected],
        ))
    return pairs


def pair_all(candidate_sets: list[CandidateSet], settings: PairingSettings, **kwargs) -> list[PreferencePair]:
    return [pair for c in candidate_sets for pair in make_pairs(c, settings, **kwargs)]


def pairing_census(candidate_sets: list[CandidateSet], settings: PairingSettings, *,
                   tie_tolerance: float = 0.0) -> dict[str, int]:
    """Why pairing found what it found: answers cut at max_new_tokens and empty ones, and prompts
    by the first reason they gave no pair (fewer than two usable answers, all usable answers
    identical, all rewards tied within tie_tolerance)."""
    census = {"prompts": len(candidate_sets), "answers": 0, "cut": 0, "empty": 0,
              "too_few": 0, "identical": 0, "tied": 0, "paired": 0}
    for c in candidate_sets:
        census["answers"] += len(c.responses)
        census["cut"] += sum(c.truncated)
        census["empty"] += sum(not r.strip() for r in c.responses)
        usable = [i for i, r in enumerate(c.responses) if r.strip() and not (settings.skip_truncated and c.truncated[i])]
        if make_pairs(c, settings, tie_tolerance=tie_tolerance):
            census["paired"] += 1
        elif len(usable) < 2:
            census["too_few"] += 1
        elif len({c.responses[i] for i in usable}) == 1:
            census["identical"] += 1
        else:
            census["tied"] += 1
    return census


def base_targets(initial_samples: list[CandidateSet]) -> dict[str, int]:
    """loss.target_length 'base': per prompt, the mean token length of the initial model's
    complete, non-empty sampled answers (iteration 1 samples from the initial model); when all
    were cut by max_new_tokens, of the cut ones (a lower bound)."""
    targets = {}
    for c in initial_samples:
        answers = [(n, cut) for n, r, cut in zip(c.n_tokens, c.responses, c.truncated) if r.strip()]
        lengths = [n for n, cut in answers if not cut] or [n for n, _ in answers]
        if lengths:
            targets[c.id] = round(sum(lengths) / len(lengths))
    return targets

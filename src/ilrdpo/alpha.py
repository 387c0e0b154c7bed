"""How the length margin's alpha of each round is decided: pure functions, every command calls them.

- next_alpha: from one round to the next, toward a length budget on the round's own sampled
  answers, known before training (iterations.alpha_control.budget set);
- per_unit_alpha: the alpha a round trains with, from its setting and its pairs (`ilrdpo run` and
  `ilrdpo train` alike; experimental.alpha_neutral expresses the setting in the pairs' neutral alpha).
"""

from __future__ import annotations

import math

import torch

from ilrdpo.config import Config
from ilrdpo.data import pair_lengths
from ilrdpo.loss import length_margin_term
from ilrdpo.loss_types import target_margin
from ilrdpo.records import PreferencePair

GAIN = 0.5  # log alpha moves by half the relative excess over the budget,
STEP = 0.2  # by at most 0.2 per round (about 20%),
MAX_FACTOR = 4.0  # and alpha stays at most 4 times loss.alpha: the demo's measured law (docs/demo/speed.md)


def length_budget(budget: float, initial_length: float) -> float:
    """The allowed mean sampled length: a budget <= 10 is relative to the initial model's, larger is tokens."""
    return budget * initial_length if budget <= 10 else budget


def next_alpha(alpha: float, sampled_length: float, initial_length: float, budget: float, start: float) -> float:
    """Alpha control's one law: round t's alpha from round t-1's, multiplied by exp(GAIN * over),
    over = mean length of round t's own samples (drawn from pi_{t-1}, before training) / budget - 1,
    the change of log alpha at most STEP; unchanged within 2% of the budget; at most MAX_FACTOR x
    start (loss.alpha). The budget is relative to round 1's samples (pi_0's) on the same prompts, so
    the law steers on training prompts only: eval and held-out lengths stay measurements."""
    over = sampled_length / max(length_budget(budget, initial_length), 1e-9) - 1
    if abs(over) > 0.02:
        alpha = alpha * math.exp(max(-STEP, min(STEP, GAIN * over)))
    return min(alpha, MAX_FACTOR * start)


def cost_gaps(pairs: list[PreferencePair], tokenizer, length_unit: str,
              target_length: float | None = None) -> list[float]:
    """c(y_w) - c(y_l) of each pair (loss.length_cost), in length_unit, from data.pair_lengths (the
    tokens generated, which pairs made from candidates carry; a pair from outside is tokenised).
    With a target length, c is the distance to the target (the pair's own, or target_length)."""
    lengths = torch.tensor([pair_lengths(tokenizer, p, length_unit) for p in pairs], dtype=torch.float64)  # (P, 2)
    targets = [p.target_length if p.target_length is not None else target_length for p in pairs]
    target = None if None in targets else torch.tensor(targets, dtype=torch.float64)
    return length_margin_term(lengths[:, 0], lengths[:, 1], 1.0, target).tolist()


def neutral_alpha(gaps: list[float], target: float) -> float:
    """The per-unit alpha at which the pairs' target margins target - alpha * g carry no length:
    the least-squares fit of the targets on the gaps through the origin has slope 0, i.e.
    sum((target - alpha * g) * g) = 0, alpha = target * sum(g) / sum(g^2). A policy fitted to those
    targets then learns no preference for length as such (to first order: a log-ratio linear in
    |y| fits them best with slope 0). Floored at 0: when chosen answers are shorter on average,
    no length term."""
    square = sum(g * g for g in gaps)
    return max(0.0, target * sum(gaps) / square) if square > 0 else 0.0


def per_unit_alpha(setting: float, config: Config, pairs: list[PreferencePair], tokenizer) -> float:
    """The alpha a round trains with, per unit of loss.length_unit: the setting itself (loss.alpha,
    or what alpha control made of it), or with experimental.alpha_neutral the setting times the
    pairs' neutral alpha. `ilrdpo run` and `ilrdpo train` both decide here."""
    if not config.experimental.alpha_neutral:
        return setting
    target = None if config.loss.target_length in (None, "base") else config.loss.target_length
    gaps = cost_gaps(pairs, tokenizer, config.loss.length_unit, target)
    return setting * neutral_alpha(gaps, target_margin(config.loss.type, config.loss.label_smoothing))

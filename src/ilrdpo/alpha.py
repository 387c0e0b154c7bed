"""How the length margin's alpha of each round is decided: pure functions, every command calls them.

- next_alpha: from one round to the next, toward a length budget on the eval prompts
  (iterations.alpha_control.mode auto);
- retry_alpha: within a round, when its eval length misses the budget's band (alpha_control.retries);
- per_unit_alpha: the alpha a round trains with, from its setting and its pairs (`ilrdpo run` and
  `ilrdpo train` alike; experimental.alpha_neutral expresses the setting in the pairs' neutral alpha).
"""

from __future__ import annotations

import math

import torch

from ilrdpo.config import AlphaControlSettings, Config
from ilrdpo.data import pair_lengths
from ilrdpo.loss import length_margin_term
from ilrdpo.loss_types import target_margin
from ilrdpo.records import PreferencePair

# From alpha = 0 a multiplicative law cannot move: it starts here (only there: a per-token alpha
# for IPO is a few thousandths, and a floor would jump it several times over).
START_ALPHA = 0.01


def length_budget(control: AlphaControlSettings, initial_length: float) -> float:
    """The allowed mean eval length: control.budget <= 10 is relative to the initial model's, larger is tokens."""
    return control.budget * initial_length if control.budget <= 10 else control.budget


def next_alpha(alpha: float, mean_length: float, initial_length: float, control: AlphaControlSettings) -> float:
    """Automatic alpha: multiplied by exp(gain * over), over = mean eval length / budget - 1, the
    change of log alpha bounded by control.step; unchanged within 2% of the budget."""
    if control.mode == "constant":
        return alpha
    over = mean_length / max(length_budget(control, initial_length), 1e-9) - 1
    if abs(over) > 0.02:
        if alpha > 0:
            alpha = alpha * math.exp(max(-control.step, min(control.step, control.gain * over)))
        elif over > 0:
            alpha = max(control.min_alpha, START_ALPHA)
    return min(max(alpha, control.min_alpha), control.max_alpha)


def control_miss(control: AlphaControlSettings, initial_length: float, length: float, trainings: int) -> str | None:
    """When a round stands outside alpha control's band (mode auto with retries): what was
    missed and why it stopped trying; None when within the band or when there is no band."""
    if control.mode != "auto" or not control.retries:
        return None
    budget = length_budget(control, initial_length)
    over = length / max(budget, 1e-9) - 1
    if abs(over) <= control.tolerance:
        return None
    why = (f"its {control.retries} retries used up" if trainings > control.retries
           else "alpha could move no further (min_alpha / max_alpha, or the same alpha again)")
    return (f"alpha control missed its band: eval length {length:.1f} is {over:+.0%} off the budget {budget:.1f} "
            f"(band ±{control.tolerance:.0%}) after {trainings} training(s), {why}")


def retry_alpha(attempts: list[tuple[float, float]], control: AlphaControlSettings) -> float | None:
    """The alpha for another attempt at a round, from its attempts so far [(alpha, over)], over =
    mean eval length / budget - 1; None when the last attempt is within the tolerance or alpha
    cannot move. Once attempts lie on both sides of the budget, log alpha is interpolated
    between the closest on each side; before that, the last one is corrected by over / response
    (too long: more alpha), at most by a factor e^(2 step) either way."""
    alpha, over = attempts[-1]
    if abs(over) <= control.tolerance or alpha <= 0:
        return None
    longer = [a for a in attempts if a[1] > 0 and a[0] > 0]
    shorter = [a for a in attempts if a[1] < 0 and a[0] > 0]
    if longer and shorter:
        (a_long, o_long), (a_short, o_short) = min(longer, key=lambda a: a[1]), max(shorter, key=lambda a: a[1])
        weight = o_long / (o_long - o_short)  # where the straight line through the two crosses over = 0
        new = math.exp(math.log(a_long) + weight * (math.log(a_short) - math.log(a_long)))
    else:
        change = max(-2 * control.step, min(2 * control.step, over / control.response))
        new = alpha * math.exp(change)
    new = min(max(new, control.min_alpha), control.max_alpha)
    return None if math.isclose(new, alpha, rel_tol=1e-9) else new


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

"""Preference losses with a length margin. Pure functions: tensors in, tensors out, torch only.

For a prompt x with chosen answer y_w and rejected answer y_l, and log pi(y|x) the sum of the
answer tokens' log-probabilities:

    delta  = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    margin = beta * delta + alpha * (c(y_w) - c(y_l))

with c(y) = |y| (tokens or characters), or c(y) = | |y| - L* | for a target length L*.
alpha = 0 is DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7); alpha > 0 is the length
margin of R-DPO (Park et al. 2024, arXiv 2403.19159) as used by iLR-DPO (Liu et al. 2024,
arXiv 2406.11817). A chosen answer that is longer already has a larger margin, so the loss
pushes less toward it; a shorter chosen answer is pushed harder.

Every loss type maps the same margin m to a per-example loss; a dict picks it (LOSSES).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ilrdpo.loss_types import LOSS_INFO, LOSS_TYPES, REFERENCE_FREE, method_name, target_margin

__all__ = ["LOSSES", "LOSS_TYPES", "REFERENCE_FREE", "LossOutput", "length_cost", "length_margin_term",
           "length_reversed", "method_name", "preference_loss", "target_margin"]

Tensor = torch.Tensor


def length_cost(lengths: Tensor, target_length: float | Tensor | None = None) -> Tensor:
    """c(y): the length itself, or its distance to a target (per example or shared)."""
    lengths = lengths.float()
    if target_length is None:
        return lengths
    target = torch.as_tensor(target_length, dtype=lengths.dtype, device=lengths.device)
    return (lengths - target).abs()


def _sigmoid(m: Tensor, beta: float, eps: float) -> Tensor:
    """DPO; eps > 0 is conservative DPO (cDPO): -(1-e) logsig(m) - e logsig(-m)."""
    return -(1 - eps) * F.logsigmoid(m) - eps * F.logsigmoid(-m)


def _robust(m: Tensor, beta: float, eps: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409): unbiased under label flips of rate e,
    [-(1-e) logsig(m) + e logsig(-m)] / (1 - 2e)."""
    return (-(1 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)) / (1 - 2 * eps)


def _ipo(m: Tensor, beta: float, eps: float) -> Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): (h - 1/(2 beta))^2 with h = m / beta,
    i.e. the log-ratio difference plus the length margin in log-prob units."""
    return (m / beta - 1 / (2 * beta)) ** 2


def _hinge(m: Tensor, beta: float, eps: float) -> Tensor:
    """SLiC hinge (Zhao et al. 2023, arXiv 2305.10425): relu(1 - m)."""
    return torch.relu(1 - m)


@dataclass(frozen=True)
class LossType:
    fn: Callable[[Tensor, float, float], Tensor]  # margin, beta, eps -> per-example loss
    name: str  # how papers and model cards call it (loss_types.LOSS_INFO)
    reference_free: bool = False


# The loss function of each type (names, method names and reference-freeness: loss_types.LOSS_INFO).
# SimPO (Meng et al. 2024, arXiv 2405.14734): reference-free, length-normalised log-probs,
# margin m = beta * (avg logp_w - avg logp_l) - gamma, then the sigmoid loss.
# LD-DPO (Liu et al. 2024, arXiv 2409.06411): the sigmoid loss on length-desensitised
# log-probs, where answer tokens past the shorter answer's length count ld_alpha times.
# The weighting is a response-mask weight (ilrdpo.logprobs.ld_weights), so the loss is DPO's.
_FUNCTIONS = {"sigmoid": _sigmoid, "robust": _robust, "ipo": _ipo, "hinge": _hinge, "simpo": _sigmoid,
              "ld_dpo": _sigmoid}
LOSSES = {name: LossType(_FUNCTIONS[name], *info) for name, info in LOSS_INFO.items()}


def length_reversed(length_term: Tensor, loss_type: str, label_smoothing: float = 0.0) -> Tensor:
    """(B,) bool: pairs whose length term exceeds the loss's target margin, so the loss prefers
    the rejected answer; all False for loss types without a target margin."""
    target = target_margin(loss_type, label_smoothing)
    return length_term > target if target is not None else torch.zeros_like(length_term, dtype=torch.bool)


# Reward margins this close to 0 are float round-off, not a preference: at step 1 the policy is
# the reference, and its log-probs computed in another batch differ from the reference's by ~1e-7.
ACCURACY_NOISE = 1e-6


def pair_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor, noise: float = ACCURACY_NOISE) -> Tensor:
    """(B,) float: 1 where the chosen answer's implicit reward beats the rejected one's. TRL's
    rewards/accuracies (chosen_rewards > rejected_rewards), with margins within `noise` counted
    as not correct (TRL counts a margin of 1e-9 as correct)."""
    return (chosen_rewards - rejected_rewards > noise).float()


class LossOutput(NamedTuple):
    losses: Tensor  # (B,)
    chosen_rewards: Tensor  # (B,)
    rejected_rewards: Tensor  # (B,)
    length_term: Tensor  # (B,) alpha * (c(y_w) - c(y_l))


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    alpha: float = 0.0,
    target_length: float | Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_scored_tokens: Tensor | None = None,
    rejected_scored_tokens: Tensor | None = None,
) -> LossOutput:
    """Per-example length-regularised preference loss.

    Args (all shape (B,)):
        policy_*_logps: summed answer log-probs under the policy (float32).
        ref_*_logps: the same under the reference; ignored (may be None) for "simpo".
        *_lengths: |y| in the length margin's unit (tokens or characters).
        *_scored_tokens: answer tokens scored (EOS included) for SimPO's averaging; default *_lengths.

    margin = beta * delta + alpha * (c(y_w) - c(y_l)); for "simpo",
    margin = beta * (logp_w / n_w - logp_l / n_l) - gamma + alpha * (c(y_w) - c(y_l)).
    alpha = 0 reduces to the plain loss of each type (DPO for "sigmoid").

    Returns (losses, chosen_rewards, rejected_rewards, length_term), each (B,); rewards are the
    implicit rewards beta * (log pi - log pi_ref) (beta * average log-prob for SimPO), detached;
    length_term is alpha * (c(y_w) - c(y_l)), the logged length/margin_term.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {sorted(LOSSES)}")
    if loss_type == "simpo":
        n_w = (chosen_scored_tokens if chosen_scored_tokens is not None else chosen_lengths).float()
        n_l = (rejected_scored_tokens if rejected_scored_tokens is not None else rejected_lengths).float()
        chosen_rewards = beta * policy_chosen_logps / n_w
        rejected_rewards = beta * policy_rejected_logps / n_l
        margin = chosen_rewards - rejected_rewards - simpo_gamma
    else:
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
        margin = chosen_rewards - rejected_rewards
    length_term = length_margin_term(chosen_lengths, rejected_lengths, alpha, target_length)  # (B,)
    losses = LOSSES[loss_type].fn(margin + length_term, beta, label_smoothing)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach(), length_term.detach())


def length_margin_term(
    chosen_lengths: Tensor, rejected_lengths: Tensor, alpha: float, target_length: float | Tensor | None = None
) -> Tensor:
    """alpha * (c(y_w) - c(y_l)) per example: the logged length/margin_term."""
    return alpha * (length_cost(chosen_lengths, target_length) - length_cost(rejected_lengths, target_length))

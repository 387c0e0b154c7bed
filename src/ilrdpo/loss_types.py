"""The loss types by name, without torch: what the config validates against, what model cards and
reports call each method, which need a reference model, and each type's target margin.

The loss functions themselves are in ilrdpo.loss (LOSSES), keyed by the same names.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class LossInfo(NamedTuple):
    name: str  # how papers and model cards call it
    reference_free: bool = False


LOSS_INFO = {
    "sigmoid": LossInfo("DPO"),
    "robust": LossInfo("robust DPO"),
    "ipo": LossInfo("IPO"),
    "hinge": LossInfo("SLiC hinge"),
    "simpo": LossInfo("SimPO", reference_free=True),
    "ld_dpo": LossInfo("LD-DPO"),
}
LOSS_TYPES = tuple(LOSS_INFO)
REFERENCE_FREE = {name for name, info in LOSS_INFO.items() if info.reference_free}


def target_margin(loss_type: str, label_smoothing: float = 0.0) -> float | None:
    """The margin m = beta * delta + length term at which a loss type is smallest, where it has
    one: IPO's 1/2 and conservative DPO's log((1 - e) / e). None: the loss falls for ever as m
    grows (DPO, robust DPO, the hinge past 1, SimPO, LD-DPO).

    Where there is one, alpha sets each pair's target instead of only reweighting it: training pulls
    beta * delta toward target - alpha * (c(y_w) - c(y_l)), so a pair whose length term exceeds the
    target is learnt the other way round (the shorter answer preferred): see loss.length_reversed."""
    if loss_type == "ipo":
        return 0.5
    if loss_type == "sigmoid" and label_smoothing > 0:
        return math.log((1 - label_smoothing) / label_smoothing)
    return None


def method_name(loss_type: str, alpha: float) -> str:
    """'LR-DPO (alpha=0.05)', or the plain name when alpha = 0: what model cards and reports show."""
    name = LOSS_INFO[loss_type].name
    return f"LR-{name} (alpha={alpha:g})" if alpha > 0 else name

"""Evaluation of an iterate: win rate, length-controlled win rate, lengths, text quality."""

from ilrdpo.evaluation.lc import JointLC, joint_lc
from ilrdpo.evaluation.lengths import length_stats
from ilrdpo.evaluation.text_metrics import embedding_similarity, text_metrics
from ilrdpo.evaluation.winrate import (
    bootstrap_ci,
    lc_win_rate,
    lc_win_rate_multi,
    pairwise_preferences,
    win_rates,
)

__all__ = [
    "JointLC",
    "bootstrap_ci",
    "embedding_similarity",
    "joint_lc",
    "lc_win_rate",
    "lc_win_rate_multi",
    "length_stats",
    "pairwise_preferences",
    "text_metrics",
    "win_rates",
]

"""Scorers (ilrdpo.scoring.scorer): the Protocol, the builder by scoring.type, batching, reward shaping."""

from ilrdpo.scoring.scorer import SCORERS, Scorer, build_scorer, judge_record, score_in_batches, shaped_rewards

__all__ = ["SCORERS", "Scorer", "build_scorer", "judge_record", "score_in_batches", "shaped_rewards"]

"""The demo's judge: MiniLM similarity to the reference answer plus a simulated verbosity bias.

Learned reward models tend to prefer longer answers. The demo makes that failure explicit: the
reward is the scorer's quality plus LENGTH_BIAS * min(n_tokens, cap) / cap, growing with the
answer's length in tokens and saturating at the longest answer the demo samples. Vanilla
iterative DPO can raise this reward by talking longer; quality (the similarity alone) is kept
apart, so the trade is visible. The bias lives here, not in the production scorers: it is the
demo's simulation, passed to the loop as its scorer (scoring.shaped_rewards adds length_bonus).
"""

from __future__ import annotations

from ilrdpo.config import Config
from ilrdpo.records import Prompt
from ilrdpo.scoring import Scorer, build_scorer

LENGTH_BIAS = 0.3  # at the cap the bias is worth 0.3 of similarity: a judge that clearly likes length


class LengthBiasedJudge:
    """A scorer whose score() is the wrapped scorer's (the quality) and whose length_bonus is
    bias * min(n, cap) / cap per answer of n tokens."""

    def __init__(self, scorer: Scorer, bias: float, cap: int) -> None:
        self.scorer, self.bias, self.cap = scorer, bias, cap
        self.name = getattr(scorer, "name", type(scorer).__name__)

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        return self.scorer.score(prompts, responses)

    def length_bonus(self, n_tokens: list[int]) -> list[float]:
        return [self.bias * min(n, self.cap) / self.cap for n in n_tokens]


def demo_judge(config: Config) -> LengthBiasedJudge:
    """The judge of a demo run: its scoring section's scorer, biased up to generation.max_new_tokens."""
    return LengthBiasedJudge(build_scorer(config.scoring), LENGTH_BIAS, config.generation.max_new_tokens)

"""Unit tier: pair strategies (ilrdpo.pairing) on hand-made candidate sets.

A candidate set holds the N scored answers of one prompt; a pair is (chosen, rejected) with
margin = chosen_reward - rejected_reward.
"""

from __future__ import annotations

import pytest

from ilrdpo.config import PairingSettings
from ilrdpo.pairing import make_pairs, pair_all
from ilrdpo.records import CandidateSet

STRATEGIES = ["best_worst", "best_random", "all"]


def cands(rewards, responses=None, n_tokens=None, truncated=None, id="q", target_length=None) -> CandidateSet:
    n = len(rewards)
    return CandidateSet(prompt=f"prompt {id}", id=id,
                        responses=responses or [f"answer {i}" for i in range(n)],
                        n_tokens=n_tokens or [10] * n, truncated=truncated or [False] * n,
                        rewards=list(rewards), target_length=target_length)


def as_tuples(pairs):
    return [(p.chosen, p.rejected) for p in pairs]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_ties_give_no_pairs(strategy):
    assert make_pairs(cands([0.5, 0.5, 0.5, 0.5]), PairingSettings(strategy=strategy)) == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_candidate_gives_no_pairs(strategy):
    assert make_pairs(cands([1.0]), PairingSettings(strategy=strategy)) == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_identical_texts_carry_no_preference(strategy):
    same = cands([1.0, 0.0], responses=["Paris.", "Paris."])
    assert make_pairs(same, PairingSettings(strategy=strategy)) == []


def test_identical_texts_are_dropped_but_other_pairs_kept():
    """Answers 0 and 1 are the same text: of the three ordered pairs by reward only (0,1) goes."""
    c = cands([3.0, 2.0, 1.0], responses=["Paris.", "Paris.", "Lyon."])
    assert as_tuples(make_pairs(c, PairingSettings(strategy="all"))) == [("Paris.", "Lyon."), ("Paris.", "Lyon.")]


def test_best_worst_picks_max_and_min_and_records_the_margin():
    c = cands([0.2, 0.9, -0.4, 0.1], target_length=30)
    (pair,) = make_pairs(c, PairingSettings(strategy="best_worst"))
    assert (pair.chosen, pair.rejected) == ("answer 1", "answer 2")
    assert (pair.chosen_reward, pair.rejected_reward) == (0.9, -0.4)
    assert pair.margin == pytest.approx(1.3)
    assert pair.prompt == "prompt q" and pair.target_length == 30


def test_best_random_rejects_a_lower_scored_answer_chosen_by_seed():
    """Rewards 4 > 3 > 2 > 1: chosen is always answer 0, rejected one of the other three; the
    draw is a function of (seed, prompt id), and over 40 seeds every lower answer appears."""
    c = cands([4.0, 3.0, 2.0, 1.0])
    settings = PairingSettings(strategy="best_random")
    rejected = []
    for seed in range(40):
        (pair,) = make_pairs(c, settings, seed=seed)
        again = make_pairs(c, settings, seed=seed)
        assert as_tuples(again) == [(pair.chosen, pair.rejected)]
        assert pair.chosen == "answer 0" and pair.rejected_reward < pair.chosen_reward
        assert pair.margin == pytest.approx(pair.chosen_reward - pair.rejected_reward)
        rejected.append(pair.rejected)
    assert set(rejected) == {"answer 1", "answer 2", "answer 3"}


def test_best_random_skips_answers_tied_with_the_best():
    """Answers 0 and 1 tie for best: the rejected answer is always 2, never the tied one."""
    c = cands([1.0, 1.0, 0.0])
    for seed in range(10):
        assert [p.rejected for p in make_pairs(c, PairingSettings(strategy="best_random"), seed=seed)] \
            == ["answer 2"]


def test_all_gives_every_pair_with_margin_beyond_the_tie_tolerance():
    """Rewards 3, 2, 0.5, 0 with tie_tolerance 1: margins 2.5, 3, 1.5, 2 pass, 0.5 (0.5 vs 0)
    does not, and a margin exactly at the tolerance (3 vs 2) is a tie (scoring.tie_tolerance, the
    one threshold since pairing.min_margin went)."""
    c = cands([3.0, 2.0, 0.5, 0.0])
    pairs = make_pairs(c, PairingSettings(strategy="all"), tie_tolerance=1.0)
    assert sorted((p.chosen_reward, p.rejected_reward) for p in pairs) == \
        [(2.0, 0.0), (2.0, 0.5), (3.0, 0.0), (3.0, 0.5)]
    assert all(p.margin == p.chosen_reward - p.rejected_reward for p in pairs)



def test_tie_tolerance_treats_close_rewards_as_ties():
    c = cands([0.50, 0.45])
    assert make_pairs(c, PairingSettings(), tie_tolerance=0.05) == []
    assert len(make_pairs(c, PairingSettings(), tie_tolerance=0.04)) == 1


def test_skip_truncated_leaves_cut_answers_out():
    """The best answer (1.0) was cut by max_new_tokens: with skip_truncated it cannot be chosen."""
    c = cands([1.0, 0.5, 0.0], truncated=[True, False, False])
    (kept,) = make_pairs(c, PairingSettings(skip_truncated=True))
    assert as_tuples([kept]) == [("answer 1", "answer 2")]
    (with_cut,) = make_pairs(c, PairingSettings(skip_truncated=False))
    assert as_tuples([with_cut]) == [("answer 0", "answer 2")]


def test_skip_truncated_with_one_whole_answer_left_gives_no_pair():
    c = cands([1.0, 0.5, 0.0], truncated=[True, False, True])
    assert make_pairs(c, PairingSettings(skip_truncated=True)) == []


@pytest.mark.unit
def test_pairs_carry_their_answers_token_counts():
    """A pair's chosen_n_tokens / rejected_n_tokens are the candidates' n_tokens (count_tokens at
    sampling time), so the length terms never tokenise again."""
    c = cands([1.0, 0.5, 0.0], n_tokens=[7, 11, 3])
    (pair,) = make_pairs(c, PairingSettings())
    assert (pair.chosen_n_tokens, pair.rejected_n_tokens) == (7, 3)


def test_pair_all_concatenates_in_prompt_order():
    sets = [cands([0.0, 1.0], id="a"), cands([0.3, 0.3], id="tied"), cands([2.0, 1.0], id="b")]
    pairs = pair_all(sets, PairingSettings())
    assert [p.prompt for p in pairs] == ["prompt a", "prompt b"]
    assert [p.margin for p in pairs] == [1.0, 1.0]

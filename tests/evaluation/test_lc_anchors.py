"""Length anchors treated as AlpacaEval treats its gamed baseline variants, and the per-model fit
at extreme lengths checked against an independent optimiser (ilrdpo.evaluation.lc)."""

import numpy as np
import pytest
from scipy.optimize import minimize

from ilrdpo.evaluation import joint_lc, lc_win_rate_multi
from ilrdpo.evaluation.lc import ANCHOR_WEIGHT, THETA_L2, fit_one_model

pytestmark = pytest.mark.unit


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _evaluation(seed, ratio, n=600, quality=-0.5, bias=1.5):
    """A model at `ratio` times the baseline's length and the baseline's concise and verbose
    variants (quality 0), judged by the GLM itself: logit = q + d_x + bias tanh(delta / s)."""
    rng = np.random.default_rng(seed)
    base = np.round(np.exp(rng.normal(7.3, 0.6, n)))
    difficulty = rng.normal(0.0, 1.0, n)

    def series(q, log_ratio, sd):
        lengths = np.maximum(1, np.round(base * np.exp(rng.normal(log_ratio, sd, n))))
        delta = lengths - base
        return _sigmoid(q + difficulty + bias * np.tanh(delta / delta.std(ddof=1)) + rng.normal(0, 1, n)), lengths

    model = series(quality, np.log(ratio), 0.5)
    anchors = {"concise": series(0.0, -0.7, 0.3), "verbose": series(0.0, 0.45, 0.3)}
    truth = 100.0 * _sigmoid(quality + difficulty).mean()
    return model, anchors, base, difficulty, truth


def test_an_anchor_is_scored_as_a_model_with_every_gamed_row():
    """AlpacaEval lists gpt4_1106_preview_concise on its leaderboard: fitted from its own rows
    plus both gamed variants' rows (its own among them). Naming an anchor as a model, or asking
    for score_anchors, gives that fit; the other models' LC do not move."""
    (prefs, lengths), anchors, base, _, _ = _evaluation(0, 0.5, n=300)
    plain = joint_lc({"m": prefs}, {"m": lengths}, base, anchors=anchors, n_boot=0)
    scored = joint_lc({"m": prefs}, {"m": lengths}, base, anchors=anchors, n_boot=0, score_anchors=True)
    named = joint_lc({"m": prefs, "concise": anchors["concise"][0]}, {"m": lengths, "concise": anchors["concise"][1]},
                     base, anchors=anchors, n_boot=0)
    assert set(plain) == {"m"} and set(scored) == {"m", "concise", "verbose"}
    assert scored["m"] == plain["m"]
    assert named["concise"].lc_win_rate == pytest.approx(scored["concise"].lc_win_rate, abs=1e-9)
    assert named["m"].lc_win_rate == pytest.approx(plain["m"].lc_win_rate, abs=1e-9)
    # a variant of the baseline with no quality gap: LC near 50 although its raw rate is far off
    assert abs(100 * anchors["concise"][0].mean() - 50) > 10
    assert abs(scored["concise"].lc_win_rate - 50) < 5
    multi = lc_win_rate_multi({"m": prefs}, {"m": lengths}, base, anchors=anchors, score_anchors=True)
    assert multi["verbose"] == pytest.approx(scored["verbose"].lc_win_rate, abs=1e-9)


def test_an_anchor_that_differs_from_the_model_of_its_name_is_refused():
    (prefs, lengths), anchors, base, _, _ = _evaluation(1, 0.5, n=50)
    with pytest.raises(ValueError, match="'concise' is also a model"):
        joint_lc({"concise": prefs}, {"concise": lengths}, base, anchors=anchors, n_boot=0)


@pytest.mark.parametrize("ratio", [0.03, 0.10, 4.0])
def test_extreme_length_model_is_pinned_by_the_gamed_rows(ratio):
    """A model at 3%, 10% or 400% of the baseline's length (shorter or longer on every prompt):
    with the gamed rows LC lands within 4 points of the truth although raw is 10+ points away."""
    (prefs, lengths), anchors, base, _, truth = _evaluation(2, ratio)
    lc = joint_lc({"x": prefs}, {"x": lengths}, base, anchors=anchors, n_boot=0)["x"].lc_win_rate
    assert abs(100 * prefs.mean() - truth) > 10
    assert abs(lc - truth) < 4.0, (lc, truth)


def test_stage_two_at_3_percent_length_matches_an_independent_optimiser():
    """fit_one_model's coefficients against scipy's L-BFGS on the same objective written out
    here: model rows theta + gamma f + beta d (weight 1), gamed rows gamma f + beta d (weight
    ANCHOR_WEIGHT / 2 each), f = tanh(delta / std(delta, ddof 1)) per series, penalty
    THETA_L2 theta^2 / 2 + l2 (gamma^2 + beta^2) / 2 with the l2 the fit chose."""
    (prefs, lengths), anchors, base, difficulty, _ = _evaluation(3, 0.03)
    a_prefs = np.array([p for p, _ in anchors.values()])
    a_delta = np.array([n for _, n in anchors.values()]) - base
    fit = fit_one_model(prefs, lengths - base, difficulty, a_prefs, a_delta, counts=None)

    feature = lambda delta: np.tanh(delta / np.std(delta, ddof=1))
    y = np.concatenate([prefs, *a_prefs])
    f = np.concatenate([feature(lengths - base), *(feature(d) for d in a_delta)])
    w = np.concatenate([np.ones(base.size), np.full(2 * base.size, ANCHOR_WEIGHT / 2)])
    is_model = np.concatenate([np.ones(base.size), np.zeros(2 * base.size)])
    d = np.tile(difficulty, 3)

    def loss(c):
        z = c[0] * is_model + c[1] * f + c[2] * d
        s = _sigmoid(z)
        value = np.sum(w * (np.logaddexp(0, z) - y * z)) + 0.5 * (THETA_L2 * c[0] ** 2 + fit.penalty * (c[1] ** 2 + c[2] ** 2))
        grad = np.array([np.sum(w * (s - y) * v) for v in (is_model, f, d)]) + np.array([THETA_L2, fit.penalty, fit.penalty]) * c
        return value, grad

    ref = minimize(loss, np.zeros(3), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 1000}).x
    assert [fit.theta, fit.gamma, fit.difficulty_slope] == pytest.approx(list(ref), abs=1e-5)
    assert fit.lc_win_rate == pytest.approx(100 * _sigmoid(ref[0] + ref[2] * difficulty).mean(), abs=1e-4)


def test_the_report_says_how_the_anchors_entered_the_fit():
    """The report's results paragraph names the anchors and their AlpacaEval weight (0.2 over
    two: 0.1 each) when the run has them, and says the slope is unpinned when it has none."""
    from pathlib import Path

    from ilrdpo.evaluation.report import anchor_sentence, joint_win_rates
    from ilrdpo.evaluation.rundata import RunData

    rng = np.random.default_rng(4)

    def answers(shift, scale):
        return [{"id": f"p{i}", "response": f"a{i}", "n_tokens": 10, "n_chars": int(100 * scale + rng.integers(0, 50)),
                 "reward": float(shift + rng.normal()), "quality": float(shift + rng.normal())} for i in range(30)]

    def run(anchors):
        return RunData(name="r", path=Path("r"), config={"data": {"eval_prompts": "e.jsonl"}},
                       answers={0: answers(0, 1), 1: answers(0.3, 0.5)}, evals={0: {}, 1: {}},
                       dirs={0: Path("r/0"), 1: Path("r/1")}, anchors=anchors)

    with_anchors = anchor_sentence(joint_win_rates([run({"concise": answers(-0.5, 0.4), "verbose": answers(0.5, 2)})]))
    assert "(concise, verbose:" in with_anchors and "weight 0.1 each" in with_anchors
    assert "No length anchors" in anchor_sentence(joint_win_rates([run({})]))
    assert anchor_sentence({}) == ""


def test_alpacaevals_names_for_its_gamed_variants_make_them_anchors():
    """Results laid out as AlpacaEval's leaderboard lays them out (gpt4_1106_preview_concise and
    _verbose among the models) fit with those two as anchors unless anchors={} says otherwise;
    at 3% of the baseline's length that moves a short model's LC by points."""
    (prefs, lengths), anchors, base, _, truth = _evaluation(3, 0.03)
    named = {f"gpt4_1106_preview_{a}": series for a, series in anchors.items()}
    preferences = {"short": prefs, **{a: s[0] for a, s in named.items()}}
    lengths_by = {"short": lengths, **{a: s[1] for a, s in named.items()}}
    found = lc_win_rate_multi(preferences, lengths_by, base)
    given = lc_win_rate_multi(preferences, lengths_by, base, anchors=named)
    without = lc_win_rate_multi(preferences, lengths_by, base, anchors={})
    assert found == pytest.approx(given, abs=1e-9)
    assert abs(found["short"] - without["short"]) > 1.0
    assert abs(found["short"] - truth) < abs(without["short"] - truth)
    # one name of the pair alone, or two pairs, is no convention: no anchors are guessed
    del preferences["gpt4_1106_preview_verbose"], lengths_by["gpt4_1106_preview_verbose"]
    assert lc_win_rate_multi(preferences, lengths_by, base) == pytest.approx(
        lc_win_rate_multi(preferences, lengths_by, base, anchors={}), abs=1e-9)

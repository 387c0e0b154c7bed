"""The joint LC GLM (ilrdpo.evaluation.lc) and its pairwise front end.

Data are generated from the GLM itself, seeded: logit p_mx = q_m + d_x + g tanh(delta / s),
so the true LC of model m is 100 mean_x sigmoid(q_m + d_x).
"""

import time

import numpy as np
import pytest

from ilrdpo.eval_stage import anchor_inputs
from ilrdpo.evaluation import joint_lc, lc_win_rate_multi
from ilrdpo.evaluation.compare import compare_all, evaluate_answers
from ilrdpo.evaluation.lc import newton_batch
from ilrdpo.records import Prompt

pytestmark = pytest.mark.unit


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _evaluation(seed, n=400, models=None, anchors=(-0.7, 0.45), bias=1.5):
    """Baseline, anchors (the baseline with log length ratio shifted, quality 0) and models
    {name: (quality, mean log length ratio)}; returns prefs, lengths, base, anchors, truth."""
    rng = np.random.default_rng(seed)
    models = models or {"short": (0.0, -0.4), "long": (0.0, 0.4), "good": (1.0, 0.0)}
    base = np.round(np.exp(rng.normal(7.0, 0.5, n)))
    difficulty = rng.normal(0.0, 1.0, n)

    def series(quality, ratio, sd=0.4):
        lengths = np.round(base * np.exp(rng.normal(ratio, sd, n)))
        delta = lengths - base
        logit = quality + difficulty + bias * np.tanh(delta / delta.std(ddof=1))
        return (rng.random(n) < _sigmoid(logit)).astype(float), lengths

    drawn = {m: series(q, r) for m, (q, r) in models.items()}
    anchor_series = {f"a{i}": series(0.0, r, 0.3) for i, r in enumerate(anchors)}
    truth = {m: 100.0 * _sigmoid(q + difficulty).mean() for m, (q, _) in models.items()}
    return ({m: p for m, (p, _) in drawn.items()}, {m: n for m, (_, n) in drawn.items()}, base,
            anchor_series, truth)


def test_newton_worked_arithmetic():
    """Three wins and a loss, intercept only: the gradient sum_i (sigmoid(t) - y_i) + l2 t is
    4 sigmoid(t) - 3 + l2 t. With l2 -> 0, sigmoid(t) = 3/4, t = ln 3 = 1.0986. With l2 = 4 the
    optimum solves 4 sigmoid(t) - 3 + 4 t = 0 (t ~ 0.16: 4 * 0.540 - 3 + 0.64 = -0.2; the
    root is checked through the equation, not a hand-rounded number)."""
    X = np.ones((2, 4, 1))
    y = np.array([1.0, 1.0, 1.0, 0.0])
    beta = newton_batch(X, y, np.ones((2, 4)), np.array([[1e-9], [4.0]]))
    assert beta[0, 0] == pytest.approx(np.log(3.0), abs=1e-6)
    t = beta[1, 0]
    assert 4 * _sigmoid(t) - 3 + 4 * t == pytest.approx(0.0, abs=1e-8)


def test_equal_lengths_give_the_raw_win_rate():
    """All deltas equal -> no length feature, one model -> no difficulty: LC = 100 sigmoid(theta)
    = raw (theta is nearly unpenalised: 5/8 wins -> 62.5)."""
    fit = joint_lc({"m": [1, 0, 1, 1, 0.5, 0, 1, 0.5]}, {"m": [30] * 8}, [20] * 8, n_boot=0)["m"]
    assert fit.lc_win_rate == pytest.approx(62.5, abs=0.01)
    assert fit.lc_identifiable is False and "equal" in fit.lc_note


def test_flipping_every_comparison_mirrors_lc_and_interval():
    """Seen from the baseline (p -> 1 - p, delta -> -delta for every model and anchor) each LC
    becomes 100 - LC and each interval [lo, hi] becomes [100 - hi, 100 - lo]: the GLM, the
    penalties and the CV folds are all symmetric under that map."""
    prefs, lengths, base, anchors, _ = _evaluation(0, n=300)
    forward = joint_lc(prefs, lengths, base, anchors=anchors, n_boot=50, seed=1)
    mirror = lambda n: 2 * base - n
    backward = joint_lc({m: 1 - p for m, p in prefs.items()}, {m: mirror(n) for m, n in lengths.items()}, base,
                        anchors={a: (1 - p, mirror(n)) for a, (p, n) in anchors.items()}, n_boot=50, seed=1)
    for m in prefs:
        assert forward[m].lc_win_rate + backward[m].lc_win_rate == pytest.approx(100.0, abs=1e-5)
        assert forward[m].lc_ci[0] + backward[m].lc_ci[1] == pytest.approx(100.0, abs=1e-5)


def test_length_bias_is_removed_and_quality_kept():
    """Length-biased judge: 'short' and 'long' have no quality gap (truth ~50) but raw rates
    far apart; 'good' has q = 1. LC must land within 4 points of each truth."""
    prefs, lengths, base, anchors, truth = _evaluation(2, n=600)
    raw = {m: 100 * p.mean() for m, p in prefs.items()}
    assert raw["long"] - raw["short"] > 20
    lc = lc_win_rate_multi(prefs, lengths, base, anchors=anchors)
    for m in prefs:
        assert abs(lc[m] - truth[m]) < 4.0, (m, lc[m], truth[m])


def test_one_sided_model_is_pinned_by_anchors():
    """A model shorter than the baseline on ~97% of prompts: its own rows cannot separate the
    length slope from quality. Without anchors it is flagged; with them it is identifiable
    (with a note) and within 4 points of the truth."""
    models = {"concise": (0.5, -0.8)}
    prefs, lengths, base, anchors, truth = _evaluation(3, n=800, models=models)
    assert np.mean(lengths["concise"] < base) > 0.95
    bare = joint_lc(prefs, lengths, base, n_boot=0)["concise"]
    assert bare.lc_identifiable is False and "no length anchors" in bare.lc_note
    pinned = joint_lc(prefs, lengths, base, anchors=anchors, n_boot=0)["concise"]
    assert pinned.lc_identifiable is True and "anchors" in pinned.lc_note
    assert abs(pinned.lc_win_rate - truth["concise"]) < 4.0
    assert abs(pinned.lc_win_rate - truth["concise"]) < abs(100 * prefs["concise"].mean() - truth["concise"])


def test_interval_covers_the_truth():
    """Over 10 simulated evaluations (3 models, 300 prompts, anchors) the 95% intervals must
    cover the true LC at least 24 times out of 30 (binomial: expected 28.5, P(<= 23) < 0.1%)."""
    covered = 0
    for seed in range(10):
        prefs, lengths, base, anchors, truth = _evaluation(100 + seed, n=300)
        fits = joint_lc(prefs, lengths, base, anchors=anchors, n_boot=100, seed=seed)
        covered += sum(fits[m].lc_ci[0] <= truth[m] <= fits[m].lc_ci[1] for m in prefs)
    assert covered >= 24


def test_fit_is_fast_enough_for_the_loop():
    """5 models x 800 prompts, 2 anchors, 200 bootstrap refits: ~1 s on one core; 10 s bound
    because the CI machine is shared."""
    models = {f"m{i}": (0.3 * i - 0.6, 0.2 * (i - 2)) for i in range(5)}
    prefs, lengths, base, anchors, _ = _evaluation(4, n=800, models=models)
    start = time.perf_counter()
    fits = joint_lc(prefs, lengths, base, anchors=anchors, n_boot=200)
    assert time.perf_counter() - start < 10.0
    assert all(f.lc_ci[0] < f.lc_win_rate < f.lc_ci[1] for f in fits.values())


def _rows(prefix, n, quality, chars):
    return [{"id": f"p{i}", "response": f"{prefix}{i}", "reward": q + 0.1, "quality": q, "n_tokens": c // 4, "truncated": False,
             "n_chars": c} for i, (q, c) in enumerate(zip(quality[:n], chars[:n]))]


def test_compare_all_aligns_prompts_and_reports_both_keys():
    rng = np.random.default_rng(5)
    n = 120
    base = _rows("b", n, rng.normal(0, 1, n), rng.integers(200, 2000, n))
    a = _rows("a", n, rng.normal(0.5, 1, n), rng.integers(200, 2000, n))
    b = _rows("c", n - 10, rng.normal(0, 1, n), rng.integers(200, 2000, n))  # misses the last 10 prompts
    anchors = {"concise": _rows("s", n, rng.normal(0, 1, n), rng.integers(100, 800, n))}
    out = compare_all({"a": a, "b": b}, base, anchors=anchors, n_boot=50)
    for name in ("a", "b"):
        for key in ("reward", "quality"):
            w = out[name][key]
            assert w["n"] == n - 10 and w["lc_models"] == 2 and w["lc_anchors"] == ["concise"]
            assert w["lc_length"] == "n_chars" and w["lc_ci"][0] <= w["lc_win_rate"] <= w["lc_ci"][1]
    result = evaluate_answers(a, [Prompt(prompt="q", id=r["id"]) for r in a], {"initial": base},
                              other_models={"b": b, "same": base}, anchors={"initial": anchors}, n_boot=20)
    assert result["vs_initial"]["lc_models"] == 2  # "same" is the baseline itself: skipped
    assert result["vs_initial"]["win_rate"] == pytest.approx(out["a"]["reward"]["win_rate"])


def test_anchor_inputs_for_string_and_chat_prompts():
    from ilrdpo.config import DataSettings

    prompts = [Prompt(prompt="Why is the sky blue?", id="s"),
               Prompt(prompt=[{"role": "user", "content": "Hi"}], id="c")]
    styled, data = anchor_inputs(prompts, DataSettings(system_prompt="Be kind."), "concise")
    assert data.system_prompt.startswith("Be kind.") and "briefly" in data.system_prompt
    assert styled[0].prompt == "Why is the sky blue?"
    assert styled[1].prompt[0]["role"] == "system" and "briefly" in styled[1].prompt[0]["content"]
    assert [p.id for p in styled] == ["s", "c"]


def test_an_interval_from_few_prompts_carries_a_warning():
    """The issue's case: an LC interval of [50, 100] from 3 prompts, with no word. Under 10
    prompts the note says so; at 10 it does not."""
    lengths = {"m": [30, 10, 25]}
    few = joint_lc({"m": [1, 0, 1]}, lengths, [20, 20, 20], n_boot=20)["m"]
    assert "Fitted on 3 prompts (fewer than 10)" in few.lc_note
    rng = np.random.default_rng(0)
    enough = joint_lc({"m": rng.integers(0, 2, 10).astype(float)}, {"m": rng.integers(10, 40, 10)},
                      rng.integers(10, 40, 10), n_boot=0)["m"]
    assert "Fitted on" not in (enough.lc_note or "")

"""Win rate and length-controlled (LC) win rate of a model against a baseline.

A judge compares the model's answer with the baseline's answer to the same prompt and returns
a preference p_i in [0, 1]: 1 = model better, 0 = baseline better, 0.5 = tie; soft values
(a judge's probability) are allowed everywhere. The raw win rate is

    win = 100 * mean_i p_i.

Judges favour long answers, so a model can win by talking more. The length-controlled win
rate of AlpacaEval 2.0 (Dubois et al. 2024, arXiv 2404.04475) answers "what would the
win rate be if both answers had the same length?": fit a logistic GLM of the preference on the
length difference, then predict with the length difference set to zero:

    delta_i = len_model_i - len_baseline_i,        s = std_i(delta_i)   (ddof = 1)
    logit P(model preferred on i) = theta + gamma * tanh(delta_i / s)
    LC = 100 * sigmoid(theta)

The fit is a MAP estimate with soft labels (cross-entropy against p_i, the "duplicate each
row with weights p and 1 - p" trick written out) and Gaussian priors:

    gamma ~ N(0, 1 / LENGTH_L2)       keeps gamma finite when the judge is a pure length
                                      rule (perfectly separable data) and shrinks it to 0 when
                                      the lengths say nothing;
    theta ~ N(0, 1 / INTERCEPT_L2)    vague (std 100 logits); only there so that a model that
                                      wins every prompt gets a finite theta (LC -> 100).

AlpacaEval itself uses an L1 penalty chosen by cross-validation plus a per-instruction
difficulty feature learned from many models; with one model and one baseline we have neither,
so a fixed L2 prior is the honest analogue. `lc_win_rate_multi` adds the shared per-prompt
difficulty term when several models are judged on the same prompts.

The fit is written with scipy rather than sklearn's LogisticRegression because sklearn puts
one penalty on every coefficient, and the multi-model GLM needs a different prior per term
(free theta_m, shrunk gamma_m, shrunk difficulties).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import minimize
from scipy.special import expit

LENGTH_L2 = 0.1  # prior precision of gamma: gamma ~ N(0, 3.2^2) in logits
INTERCEPT_L2 = 1e-4  # prior precision of theta: gamma's partner, effectively unpenalised
DIFFICULTY_L2 = 1.0  # prior precision of per-prompt difficulties d_x ~ N(0, 1)
ONE_SIDED_SHARE = 0.95  # model longer (or shorter) on this share of prompts: not identifiable


def pairwise_preferences(
    model_scores: Sequence[float], baseline_scores: Sequence[float], tie_tolerance: float = 0.0
) -> list[float]:
    """Turn per-prompt scores into preferences for the model.

    p_i = 1.0 if m_i > b_i + tol, 0.0 if m_i < b_i - tol, else 0.5 (a tie).
    """
    if len(model_scores) != len(baseline_scores):
        raise ValueError(
            f"model_scores has {len(model_scores)} entries, baseline_scores {len(baseline_scores)}"
        )
    prefs = []
    for model_score, baseline_score in zip(model_scores, baseline_scores):
        if model_score > baseline_score + tie_tolerance:
            prefs.append(1.0)
        elif model_score < baseline_score - tie_tolerance:
            prefs.append(0.0)
        else:
            prefs.append(0.5)
    return prefs


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values` (same units).

    Resample the n values with replacement n_boot times, take each resample's mean, and return
    the (1 - level)/2 and (1 + level)/2 quantiles of those means (Efron & Tibshirani 1993,
    ch. 13). Seeded, so the same inputs always give the same interval.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(n_boot, data.size))  # (n_boot, n)
    means = data[idx].mean(axis=1)  # (n_boot,)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def _fit_soft_logistic(features, prefs: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """MAP logistic regression with soft labels; returns beta.

    minimise  sum_i [softplus(z_i) - p_i z_i] + 1/2 sum_j l2_j beta_j^2,   z = X beta,

    which is sum_i CE(p_i, sigmoid(z_i)) plus Gaussian priors. Every l2_j > 0 makes the
    objective strictly convex, so the optimum is unique and L-BFGS finds it from zero.
    `features` may be a dense array or a scipy sparse matrix, shape (n_rows, n_coef).
    """

    def objective(beta: np.ndarray) -> tuple[float, np.ndarray]:
        z = features @ beta  # (n_rows,)
        loss = np.sum(np.logaddexp(0.0, z) - prefs * z) + 0.5 * np.sum(l2 * beta**2)
        grad = features.T @ (expit(z) - prefs) + l2 * beta
        return float(loss), np.asarray(grad, dtype=float)

    result = minimize(
        objective,
        np.zeros(features.shape[1]),
        jac=True,
        method="L-BFGS-B",
        # Tight tolerances: the symmetry win(m, b) = 100 - win(b, m) should hold to ~1e-6.
        options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-9},
    )
    return result.x


def _length_feature(model_lengths, baseline_lengths) -> tuple[np.ndarray, float]:
    """tanh(delta_i / s) with delta = model - baseline and s = std(delta, ddof=1).

    tanh bounds the influence of one extreme length gap (as in AlpacaEval). When s is zero
    or undefined (n < 2) the feature is all zeros, so the fit reduces to an intercept.
    """
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    spread = float(np.std(delta, ddof=1)) if delta.size > 1 else math.nan
    if not math.isfinite(spread) or spread == 0.0:
        return np.zeros_like(delta), 0.0
    return np.tanh(delta / spread), spread


def _identifiability(delta: np.ndarray, spread: float) -> tuple[bool, str | None]:
    """Whether the length effect can be told apart from quality, with a note when not.

    Not identifiable when all length differences are equal (s = 0) or when they are one-sided:
    the model is longer (or shorter) on at least ONE_SIDED_SHARE of prompts, so delta = 0 is
    never observed and LC is an extrapolation that rests on the prior on gamma. The rule uses
    strict "longer" and "shorter" shares so that it is symmetric under swapping model and
    baseline.
    """
    if spread == 0.0:
        return False, (
            "All length differences are equal, so a length effect cannot be separated from "
            "quality; the LC win rate falls back to the raw win rate."
        )
    for share, word in ((np.mean(delta > 0), "longer"), (np.mean(delta < 0), "shorter")):
        if share >= ONE_SIDED_SHARE:
            return False, (
                f"The model is {word} than the baseline on {share:.0%} of prompts, so equal "
                "lengths are never observed and the LC win rate is an extrapolation set "
                "mostly by the regularisation prior."
            )
    return True, None


def lc_win_rate(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    *,
    length_l2: float = LENGTH_L2,
) -> dict:
    """Length-controlled win rate of one model against a baseline (AlpacaEval 2.0 GLM).

    logit P(model preferred on i) = theta + gamma * tanh(delta_i / s),  LC = 100 sigmoid(theta),
    fitted as in the module docstring. Always returns the fitted number, never NaN: when the
    design is not identifiable (`lc_identifiable` False, reason in `lc_note`) the number is
    still the penalised fit, which is the raw win rate when s = 0 (up to the vague theta prior,
    which matters only when the model wins or loses every prompt).

    Returns lc_win_rate (percent), theta, gamma, length_std (s), lc_identifiable, lc_note.
    """
    prefs = _check_inputs(preferences, model_lengths, baseline_lengths)
    feature, spread = _length_feature(model_lengths, baseline_lengths)
    design = np.column_stack([np.ones_like(feature), feature])  # (n, 2): theta, gamma
    theta, gamma = _fit_soft_logistic(design, prefs, np.array([INTERCEPT_L2, length_l2]))
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    identifiable, note = _identifiability(delta, spread)
    return {
        "lc_win_rate": float(100.0 * expit(theta)),
        "theta": float(theta),
        "gamma": float(gamma),
        "length_std": spread,
        "lc_identifiable": identifiable,
        "lc_note": note,
    }


def win_rates(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Raw and length-controlled win rate of a model against a baseline, in percent.

    win_rate = 100 * mean(p_i) with a seeded percentile-bootstrap 95% interval `win_rate_ci`;
    lc_win_rate from `lc_win_rate` (AlpacaEval 2.0, arXiv 2404.04475). Lengths are in any
    unit (tokens or characters) as long as model and baseline use the same one.

    Returns win_rate, win_rate_ci [lo, hi], lc_win_rate, n, ties (count of p_i == 0.5),
    model_longer_share, model_shorter_share, length_std, lc_gamma, lc_identifiable, lc_note.
    """
    prefs = _check_inputs(preferences, model_lengths, baseline_lengths)
    lc = lc_win_rate(prefs, model_lengths, baseline_lengths)
    lo, hi = bootstrap_ci(100.0 * prefs, n_boot=n_boot, seed=seed)
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    return {
        "win_rate": float(100.0 * prefs.mean()),
        "win_rate_ci": [lo, hi],
        "lc_win_rate": lc["lc_win_rate"],
        "n": int(prefs.size),
        "ties": int(np.sum(prefs == 0.5)),
        "model_longer_share": float(np.mean(delta > 0)),
        "model_shorter_share": float(np.mean(delta < 0)),
        "length_std": lc["length_std"],
        "lc_gamma": lc["gamma"],
        "lc_identifiable": lc["lc_identifiable"],
        "lc_note": lc["lc_note"],
    }


def lc_win_rate_multi(
    preferences_by_model: dict[str, Sequence[float]],
    lengths_by_model: dict[str, Sequence[int]],
    baseline_lengths: Sequence[int],
    *,
    length_l2: float = LENGTH_L2,
    difficulty_l2: float = DIFFICULTY_L2,
) -> dict[str, float]:
    """LC win rates of several models judged against one baseline on the same prompts.

    One GLM over all (model m, prompt x) pairs, with a per-prompt difficulty d_x shared by
    every model (how hard it is to beat the baseline on x; AlpacaEval's instruction
    difficulty, arXiv 2404.04475):

        logit P(m preferred on x) = theta_m + gamma_m * tanh(delta_mx / s_m) + d_x
        LC_m = 100 * mean_x sigmoid(theta_m + d_x)

    s_m = std_x(delta_mx). Priors: theta_m vague, gamma_m ~ N(0, 1/length_l2),
    d_x ~ N(0, 1/difficulty_l2); the d_x prior is what lets the fit run with one model.
    Returns {model name: LC win rate in percent}.
    """
    names = list(preferences_by_model)
    if set(names) != set(lengths_by_model):
        raise ValueError("preferences_by_model and lengths_by_model must name the same models")
    design, prefs = _multi_design(names, preferences_by_model, lengths_by_model, baseline_lengths)
    n_models, n_prompts = len(names), len(baseline_lengths)
    l2 = np.concatenate(
        [
            np.full(n_models, INTERCEPT_L2),
            np.full(n_models, length_l2),
            np.full(n_prompts, difficulty_l2),
        ]
    )
    beta = _fit_soft_logistic(design, prefs, l2)
    theta, difficulty = beta[:n_models], beta[2 * n_models :]
    return {
        name: float(100.0 * np.mean(expit(theta[m] + difficulty))) for m, name in enumerate(names)
    }


def _multi_design(names, preferences_by_model, lengths_by_model, baseline_lengths):
    """Sparse design matrix and stacked preferences of the multi-model GLM.

    Row m * P + x is model m on prompt x; columns are
    [theta_0..theta_{M-1} | gamma_0..gamma_{M-1} | d_0..d_{P-1}]. Three non-zeros per row, so
    sparse storage keeps memory at O(M P) instead of O(M P^2).
    """
    n_models, n_prompts = len(names), len(baseline_lengths)
    rows, cols, vals, prefs = [], [], [], []
    for m, name in enumerate(names):
        prefs.append(
            _check_inputs(preferences_by_model[name], lengths_by_model[name], baseline_lengths)
        )
        feature, _ = _length_feature(lengths_by_model[name], baseline_lengths)
        row = m * n_prompts + np.arange(n_prompts)
        rows += [row, row, row]
        cols += [
            np.full(n_prompts, m),
            np.full(n_prompts, n_models + m),
            2 * n_models + np.arange(n_prompts),
        ]
        vals += [np.ones(n_prompts), feature, np.ones(n_prompts)]
    design = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_models * n_prompts, 2 * n_models + n_prompts),
    )
    return design, np.concatenate(prefs)


def _check_inputs(preferences, model_lengths, baseline_lengths) -> np.ndarray:
    """Preferences as a float array, after checking sizes and range; raises ValueError."""
    prefs = np.asarray(preferences, dtype=float)
    if prefs.size == 0:
        raise ValueError("no preferences given")
    if not (len(prefs) == len(model_lengths) == len(baseline_lengths)):
        raise ValueError(
            f"lengths differ: {len(prefs)} preferences, {len(model_lengths)} model lengths, "
            f"{len(baseline_lengths)} baseline lengths"
        )
    if not np.all((prefs >= 0.0) & (prefs <= 1.0)):
        raise ValueError("preferences must lie in [0, 1]")
    return prefs

"""Win rate and length-controlled (LC) win rate of models against a baseline.

A judge compares a model's answer with the baseline's answer to the same prompt and returns a
preference p_i in [0, 1]: 1 = model better, 0 = baseline better, 0.5 = tie; soft values (a
judge's probability) are allowed everywhere. The raw win rate is

    win = 100 * mean_i p_i,

with a percentile-bootstrap 95% interval. Judges favour long answers, so a model can win by
talking more; the length-controlled win rate of AlpacaEval 2.0 (Dubois et al. 2024, arXiv
2404.04475) answers "what would the win rate be if both answers had the same length?". Its GLM
lives in `ilrdpo.evaluation.lc` (`joint_lc`): one fit per evaluation over every model judged
on the same prompts against the same baseline, with an instruction-difficulty term, optional
length anchors and a bootstrap interval. The functions here are the per-model views of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from ilrdpo.evaluation.lc import joint_lc


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


def lc_win_rate(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    *,
    anchors: dict[str, tuple] | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> dict:
    """LC win rate of one model against a baseline: `joint_lc` with a single model.

    With one model there is no other series to learn an instruction difficulty from (unless
    anchors are given), so this is AlpacaEval's GLM without that term. Always a number, never
    NaN: when the design is not identifiable (`lc_identifiable` False, reason in `lc_note`) it
    is still the penalised fit, which is the raw win rate when all length differences are equal.

    Returns lc_win_rate (percent), lc_ci ([lo, hi] or None when n_boot = 0), theta, gamma,
    difficulty_slope, length_std (s), penalty (CV-chosen l2), lc_identifiable, lc_note.
    """
    prefs = _check_inputs(preferences, model_lengths, baseline_lengths)
    fit = joint_lc({"model": prefs}, {"model": model_lengths}, baseline_lengths, anchors=anchors,
                   n_boot=n_boot, seed=seed)["model"]
    return asdict(fit)


def win_rates(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    lc: dict | None = None,
) -> dict:
    """Raw and length-controlled win rate of a model against a baseline, in percent.

    win_rate = 100 * mean(p_i) with a seeded percentile-bootstrap 95% interval `win_rate_ci`.
    `lc` is this model's entry of a joint fit (`joint_lc`, as a dict); without it the model is
    fitted alone (`lc_win_rate`). Lengths are in any unit, the same for model and baseline.

    Returns win_rate, win_rate_ci [lo, hi], lc_win_rate, lc_ci [lo, hi], n, ties (count of
    p_i == 0.5), model_longer_share, model_shorter_share, length_std, lc_gamma, lc_penalty,
    lc_identifiable, lc_note.
    """
    prefs = _check_inputs(preferences, model_lengths, baseline_lengths)
    if lc is None:
        lc = lc_win_rate(prefs, model_lengths, baseline_lengths, n_boot=min(n_boot, 200), seed=seed)
    lo, hi = bootstrap_ci(100.0 * prefs, n_boot=n_boot, seed=seed)
    delta = np.asarray(model_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    return {
        "win_rate": float(100.0 * prefs.mean()),
        "win_rate_ci": [lo, hi],
        "lc_win_rate": lc["lc_win_rate"],
        "lc_ci": lc["lc_ci"],
        "n": int(prefs.size),
        "ties": int(np.sum(prefs == 0.5)),
        "model_longer_share": float(np.mean(delta > 0)),
        "model_shorter_share": float(np.mean(delta < 0)),
        "length_std": lc["length_std"],
        "lc_gamma": lc["gamma"],
        "lc_penalty": lc["penalty"],
        "lc_identifiable": lc["lc_identifiable"],
        "lc_note": lc["lc_note"],
    }


def lc_win_rate_multi(
    preferences_by_model: dict[str, Sequence[float]],
    lengths_by_model: dict[str, Sequence[int]],
    baseline_lengths: Sequence[int],
    *,
    anchors: dict[str, tuple[Sequence[float], Sequence[int]]] | None = None,
    seed: int = 0,
    score_anchors: bool = False,
) -> dict[str, float]:
    """LC win rates (percent) of several models judged against one baseline on the same
    prompts, fitted jointly by `joint_lc` (no bootstrap; call joint_lc for intervals).

    anchors: the baseline's gamed variants (AlpacaEval's df_gamed rows); a name may also be a
    model (it is then scored as AlpacaEval scores its gamed variants). Left out (None), the
    models are searched for AlpacaEval's own naming of those variants (`NAME_concise` beside
    `NAME_verbose`, see `named_anchors`); pass {} to fit without anchors. Returns {model name: LC
    win rate in percent}, with the anchors too when score_anchors.
    """
    if set(preferences_by_model) != set(lengths_by_model):
        raise ValueError("preferences_by_model and lengths_by_model must name the same models")
    for name, prefs in preferences_by_model.items():
        _check_inputs(prefs, lengths_by_model[name], baseline_lengths)
    if anchors is None:
        anchors = named_anchors(preferences_by_model, lengths_by_model)
    for name, (prefs, lengths) in anchors.items():
        _check_inputs(prefs, lengths, baseline_lengths)
    fits = joint_lc(preferences_by_model, lengths_by_model, baseline_lengths, anchors=anchors,
                    n_boot=0, seed=seed, score_anchors=score_anchors)
    return {name: fit.lc_win_rate for name, fit in fits.items()}


def named_anchors(preferences_by_model: dict[str, Sequence[float]],
                  lengths_by_model: dict[str, Sequence[int]]) -> dict[str, tuple]:
    """The models named as AlpacaEval names its baseline's gamed variants: a pair
    `NAME_concise` and `NAME_verbose` (one pair: with several, none is taken), as anchors."""
    stems = [name[: -len("_concise")] for name in preferences_by_model
             if name.endswith("_concise") and f"{name[: -len('_concise')]}_verbose" in preferences_by_model]
    if len(stems) != 1:
        return {}
    names = (f"{stems[0]}_concise", f"{stems[0]}_verbose")
    return {a: (preferences_by_model[a], lengths_by_model[a]) for a in names}


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

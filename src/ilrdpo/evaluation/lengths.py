"""Length statistics of generated answers.

Length is the quantity iLR-DPO regularises (Liu et al. 2024, arXiv 2406.11817), so every
evaluation reports it next to the win rates: centre, spread (as percentiles, ready for a
histogram or box plot), how often generation hit max_new_tokens, and, for prompts that carry
a target length L*_i, how far each answer lands from its own target.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (10, 25, 50, 75, 90)


def length_stats(
    n_tokens: Sequence[int],
    n_chars: Sequence[int],
    truncated: Sequence[bool] | None = None,
    target_lengths: Sequence[int | None] | None = None,
    *,
    target_unit: str = "tokens",
) -> dict:
    """Summary of answer lengths; undefined values (no answers, no targets) are None.

    Keys: n; tokens_mean, tokens_median, tokens_std, tokens_min, tokens_max;
    tokens_p10, tokens_p25, tokens_p50, tokens_p75, tokens_p90; chars_mean, chars_median;
    truncated_share (share of answers cut at max_new_tokens; None without `truncated`).

    With `target_lengths` (None entries = no target; unit `target_unit`, "tokens" or "chars",
    matching loss.length_unit), over the k answers that have a target:

        err_i = len_i - L*_i
        target_mae  = mean_i |err_i|
        target_rmse = sqrt(mean_i err_i^2)
        target_bias = mean_i err_i          (> 0: answers run long)

    plus target_count = k. Each answer is compared with ITS OWN target, so a set of answers
    that each hit different targets exactly scores 0.
    """
    if len(n_tokens) != len(n_chars):
        raise ValueError(f"n_tokens has {len(n_tokens)} entries, n_chars {len(n_chars)}")
    tokens = np.asarray(n_tokens, dtype=float)
    chars = np.asarray(n_chars, dtype=float)
    stats: dict = {"n": int(tokens.size)}
    stats.update(_describe(tokens, "tokens", full=True))
    stats.update(_describe(chars, "chars", full=False))
    stats["truncated_share"] = _truncated_share(truncated, tokens.size)
    if target_lengths is not None:
        lengths = {"tokens": tokens, "chars": chars}.get(target_unit)
        if lengths is None:
            raise ValueError(f"target_unit must be 'tokens' or 'chars', not {target_unit!r}")
        stats.update(_target_errors(lengths, target_lengths))
    return stats


def _describe(values: np.ndarray, prefix: str, *, full: bool) -> dict:
    """Mean and median (and with `full`: std, min, max, percentiles) under `prefix`_ keys."""
    keys = ["mean", "median"]
    if full:
        keys += ["std", "min", "max"] + [f"p{q}" for q in PERCENTILES]
    if values.size == 0:
        return {f"{prefix}_{key}": None for key in keys}
    out = {"mean": values.mean(), "median": np.median(values)}
    if full:
        out.update(std=values.std(), min=values.min(), max=values.max())
        out.update({f"p{q}": v for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))})
    return {f"{prefix}_{key}": float(value) for key, value in out.items()}


def _truncated_share(truncated: Sequence[bool] | None, n: int) -> float | None:
    """Share of answers that stopped at the token limit rather than at end-of-sequence."""
    if truncated is None or n == 0:
        return None
    if len(truncated) != n:
        raise ValueError(f"truncated has {len(truncated)} entries, expected {n}")
    return float(np.mean(np.asarray(truncated, dtype=bool)))


def _target_errors(lengths: np.ndarray, target_lengths: Sequence[int | None]) -> dict:
    """MAE, RMSE and bias of len_i - L*_i over the answers that have a target."""
    if len(target_lengths) != lengths.size:
        raise ValueError(
            f"target_lengths has {len(target_lengths)} entries, expected {lengths.size}"
        )
    has_target = np.array([t is not None for t in target_lengths], dtype=bool)
    count = int(has_target.sum())
    if count == 0:
        return {"target_count": 0, "target_mae": None, "target_rmse": None, "target_bias": None}
    targets = np.array([t for t in target_lengths if t is not None], dtype=float)
    errors = lengths[has_target] - targets  # (k,) each answer against its own target
    return {
        "target_count": count,
        "target_mae": float(np.mean(np.abs(errors))),
        "target_rmse": float(np.sqrt(np.mean(errors**2))),
        "target_bias": float(np.mean(errors)),
    }

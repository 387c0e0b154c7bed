"""Length-controlled (LC) win rate: AlpacaEval 2.0's v1 GLM, fitted jointly over one evaluation.

Several models m (and optionally length anchors a: the baseline itself told to be concise or
verbose) are judged against one baseline on the same prompts x. p_mx in [0, 1] is the judge's
preference for m over the baseline (soft values allowed), delta_mx = len_mx - len_baseline_x.
The GLM of AlpacaEval 2.0 (Dubois et al. 2024, arXiv 2404.04475; alpaca_eval's
metrics/glm_winrate.py, "length_controlled_v1") is, per model,

    f_mx  = tanh(delta_mx / s_m),            s_m = std_x(delta_mx), ddof 1
    logit P(m preferred on x)  = theta_m + gamma_m f_mx + beta_m d_x        (model rows)
    logit P(a preferred on x)  =           gamma_m f_ax + beta_m d_x        (anchor rows)
    LC_m = 100 mean_x sigmoid(theta_m + beta_m d_x)                          (f set to 0)

The anchor rows have no theta: a baseline variant has no quality gap to the baseline, so they
pin the length slope gamma_m, which a model that is longer (or shorter) on almost every prompt
cannot identify from its own rows. They carry a total weight of ANCHOR_WEIGHT per prompt, split
over the anchors (AlpacaEval's regularize_to_baseline_lambda = 0.2). d_x is the instruction
difficulty; AlpacaEval downloads one fitted once on its leaderboard, we have none, so it is
learned here from the evaluation itself (stage 1 of `joint_lc`):

    logit P(s preferred on x) = theta_s + gamma_s f_sx + d_x     for every model and anchor s,

a joint fit with d_x ~ N(0, 1/l2_d), l2_d chosen by cross-validation over (series, prompt)
cells. Model m's difficulty is fitted without m's own rows (cross-fitting), as a published
difficulty file was fitted without the model being scored: with few models, d_x fitted on m's
own preferences would soak up m's residuals and pull LC back to the raw win rate.

Stage 2 (per model) uses an L2 penalty on (theta, gamma, beta) chosen by 5-fold
cross-validation over prompts on AlpacaEval's grid (it uses L1 with liblinear; L2 keeps the
objective smooth so that all folds and bootstrap refits solve at once by Newton's method). The
95% interval is a percentile bootstrap over prompts: every replicate refits stage 2 (length
scales included) from the full-data fit, with l2 and d_x held at their full-data values.
docs/lc.md lists every difference from AlpacaEval and the agreement measured against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

ANCHOR_WEIGHT = 0.2  # total weight of the anchor rows of one prompt (AlpacaEval: 0.2)
PENALTY_GRID = np.logspace(-4, 4, 10)  # stage-2 L2 precisions tried; AlpacaEval's C grid inverted
DIFFICULTY_GRID = np.logspace(-2, 2, 7)  # stage-1 precisions of d_x tried
THETA_L2 = 1e-4  # stage-2 theta ~ N(0, 100^2): finite when a model wins every prompt, else free
SERIES_L2 = 1e-2  # stage-1 theta_s, gamma_s ~ N(0, 10^2): only keeps separable series finite
CV_FOLDS = 5
ONE_SIDED_SHARE = 0.95  # longer (or shorter) on this share of prompts: slope not identifiable


@dataclass(frozen=True)
class JointLC:
    """One model's LC fit. lc_ci is None without bootstrap; penalty is the CV-chosen l2."""

    lc_win_rate: float
    lc_ci: list[float] | None
    theta: float
    gamma: float
    difficulty_slope: float
    length_std: float
    penalty: float
    lc_identifiable: bool
    lc_note: str | None


def scaled_tanh(delta: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """tanh(delta / s) and s per series, s = std(delta, ddof=1) over the last axis.

    delta (S, P); counts (R, P) are bootstrap multiplicities, giving (R, S, P) features and
    (R, S) scales from the resampled prompts. A series with s = 0 gets an all-zero feature.
    """
    if counts is None:
        counts = np.ones((1, delta.shape[-1]))
    n = counts.sum(axis=1)[:, None]  # (R, 1)
    mean = np.einsum("rp,sp->rs", counts, delta) / n  # (R, S)
    var = np.einsum("rp,rsp->rs", counts, (delta[None] - mean[..., None]) ** 2) / np.maximum(n - 1, 1)
    spread = np.sqrt(var)  # (R, S)
    safe = np.where(spread > 0, spread, 1.0)
    feature = np.where(spread[..., None] > 0, np.tanh(delta[None] / safe[..., None]), 0.0)  # (R, S, P)
    return feature, spread


def newton_batch(X: np.ndarray, y: np.ndarray, W: np.ndarray, l2: np.ndarray,
                 start: np.ndarray | None = None, max_iter: int = 100) -> np.ndarray:
    """R independent small soft-label logistic fits at once, by damped Newton; returns (R, K).

    Replicate r minimises sum_n W_rn [softplus(z_rn) - y_n z_rn] + 1/2 sum_k l2_rk beta_rk^2
    with z_r = X_r beta_r. X (R, N, K) (a broadcast view is fine), y (N,), W (R, N), l2 (R, K).
    """
    R, _, K = X.shape
    beta = np.zeros((R, K)) if start is None else start.copy()

    def objective(b):
        z = np.matmul(X, b[..., None])[..., 0]  # (R, N)
        return np.sum(W * (np.logaddexp(0.0, z) - y * z), axis=1) + 0.5 * np.sum(l2 * b**2, axis=1), z

    loss, z = objective(beta)
    scale = 1.0 + W.sum(axis=1)  # (R,)
    for _ in range(max_iter):
        s = expit(z)
        grad = np.matmul((W * (s - y))[:, None], X)[:, 0] + l2 * beta  # (R, K)
        if np.all(np.abs(grad).max(axis=1) < 1e-9 * scale):
            break
        hess = np.matmul(X.transpose(0, 2, 1) * (W * s * (1 - s))[:, None], X) + l2[:, :, None] * np.eye(K)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]  # (R, K)
        t = np.ones(R)
        for _ in range(40):  # halve the step where the loss did not go down
            new_loss, new_z = objective(beta - t[:, None] * step)
            worse = new_loss > loss + 1e-12 * np.abs(loss)
            if not worse.any():
                break
            t = np.where(worse, t / 2, t)
        keep = ~worse  # a replicate that never improved is at its optimum to machine precision
        beta = np.where(keep[:, None], beta - t[:, None] * step, beta)
        loss, z = np.where(keep, new_loss, loss), np.where(keep[:, None], new_z, z)
    return beta


def fit_difficulty(prefs: np.ndarray, features: np.ndarray, weights: np.ndarray, l2_d: float,
                   start: tuple | None = None, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage-1 fit: logit p_sx = theta_s + gamma_s f_sx + d_x, returns (theta, gamma, d).

    prefs, features, weights (S, P). Minimises the weighted soft-label cross-entropy plus
    SERIES_L2/2 (|theta|^2 + |gamma|^2) + l2_d/2 |d|^2 by Newton's method. The Hessian is an
    arrowhead: a 2S x 2S block for (theta, gamma), a diagonal for d and a border between them,
    so each step eliminates d (Schur complement) and solves a 2S x 2S system: O(S P + S^3).
    """
    S, P = prefs.shape
    theta, gamma, d = start if start is not None else (np.zeros(S), np.zeros(S), np.zeros(P))

    def objective(theta, gamma, d):
        z = theta[:, None] + gamma[:, None] * features + d[None]  # (S, P)
        penalty = 0.5 * SERIES_L2 * (theta @ theta + gamma @ gamma) + 0.5 * l2_d * d @ d
        return float(np.sum(weights * (np.logaddexp(0.0, z) - prefs * z)) + penalty), z

    loss, z = objective(theta, gamma, d)
    for _ in range(max_iter):
        s = expit(z)
        r, h = weights * (s - prefs), weights * s * (1 - s)  # (S, P)
        g_a = np.concatenate([r.sum(1) + SERIES_L2 * theta, (r * features).sum(1) + SERIES_L2 * gamma])
        g_d = r.sum(0) + l2_d * d  # (P,)
        if max(np.abs(g_a).max(), np.abs(g_d).max()) < 1e-9 * (1.0 + weights.sum() / P):
            break
        hf = h * features
        A = np.zeros((2 * S, 2 * S))
        idx = np.arange(S)
        A[idx, idx] = h.sum(1) + SERIES_L2
        A[S + idx, S + idx] = (hf * features).sum(1) + SERIES_L2
        A[idx, S + idx] = A[S + idx, idx] = hf.sum(1)
        border = np.vstack([h, hf])  # (2S, P)
        D = h.sum(0) + l2_d  # (P,)
        step_a = np.linalg.solve(A - (border / D) @ border.T, g_a - border @ (g_d / D))
        step_d = (g_d - border.T @ step_a) / D
        t = 1.0
        for _ in range(40):  # backtracking: Newton steps can overshoot on near-separable data
            new = (theta - t * step_a[:S], gamma - t * step_a[S:], d - t * step_d)
            new_loss, new_z = objective(*new)
            if new_loss <= loss + 1e-12 * abs(loss):
                break
            t /= 2
        else:
            break
        (theta, gamma, d), loss, z = new, new_loss, new_z
    return theta, gamma, d


def instruction_difficulty(prefs: np.ndarray, features: np.ndarray, leave_out: list[int],
                           seed: int = 0) -> tuple[np.ndarray, float]:
    """Stage 1: per-prompt difficulty d_x, one estimate per series in `leave_out` fitted
    without that series' rows, and the precision l2_d chosen by K-fold cross-validation over
    (series, prompt) cells (a held-out cell is predicted from the other series on its prompt).

    prefs, features (S, P): every model and anchor against the baseline. Returns (len(leave_out), P).
    """
    S, P = prefs.shape
    if S < 2:  # with one series, leaving it out leaves no data: d_x = 0
        return np.zeros((len(leave_out), P)), math.nan
    fold = (np.random.default_rng(seed).permutation(S * P) % CV_FOLDS).reshape(S, P)
    cv_loss = np.zeros(len(DIFFICULTY_GRID))
    for k in range(CV_FOLDS):
        fit = None
        for g, l2_d in enumerate(DIFFICULTY_GRID):  # warm start along the grid
            fit = fit_difficulty(prefs, features, (fold != k).astype(float), l2_d, fit)
            z = fit[0][:, None] + fit[1][:, None] * features + fit[2][None]
            cv_loss[g] += np.sum((fold == k) * (np.logaddexp(0.0, z) - prefs * z))
    l2_d = float(DIFFICULTY_GRID[np.argmin(cv_loss)])
    full = fit_difficulty(prefs, features, np.ones_like(prefs), l2_d)
    out = np.empty((len(leave_out), P))
    for i, s in enumerate(leave_out):
        weights = np.ones_like(prefs)
        weights[s] = 0.0
        out[i] = fit_difficulty(prefs, features, weights, l2_d, full)[2]
    return out, l2_d


def fit_one_model(prefs: np.ndarray, delta: np.ndarray, difficulty: np.ndarray, anchor_prefs: np.ndarray,
                  anchor_delta: np.ndarray, *, anchor_weight: float = ANCHOR_WEIGHT, counts: np.ndarray | None,
                  level: float = 0.95, seed: int = 0) -> JointLC:
    """Stage 2 for one model: CV-chosen penalty, full fit, then the bootstrap refits.

    prefs, delta, difficulty (P,); anchor_* (A, P); counts (B, P) bootstrap multiplicities or None.
    Rows are the P model rows followed by the A*P anchor rows; coefficients (theta, gamma, beta).
    """
    P, A = prefs.size, anchor_prefs.shape[0]
    y = np.concatenate([prefs, anchor_prefs.ravel()])  # (N,)
    prompt_of = np.tile(np.arange(P), 1 + A)  # (N,)
    row_weight = np.concatenate([np.ones(P), np.full(A * P, anchor_weight / max(A, 1))])
    is_model = np.concatenate([np.ones(P), np.zeros(A * P)])
    all_delta = np.vstack([delta[None], anchor_delta])  # (1 + A, P)

    def design(c: np.ndarray) -> np.ndarray:  # (R, N, 3) for multiplicities c (R, P)
        feature, _ = scaled_tanh(all_delta, c)  # (R, 1 + A, P)
        R = c.shape[0]
        return np.stack([np.broadcast_to(is_model, (R, y.size)), feature.reshape(R, -1),
                         np.broadcast_to(difficulty[prompt_of], (R, y.size))], axis=-1)

    X = design(np.ones((1, P)))  # (1, N, 3)
    # 1. the penalty, by K-fold CV over prompts (a prompt's model and anchor rows stay together)
    fold = np.random.default_rng(seed).permutation(P) % CV_FOLDS
    G = len(PENALTY_GRID)
    held = fold[prompt_of][None] == np.arange(CV_FOLDS)[:, None]  # (K, N)
    W = np.tile(row_weight * ~held, (G, 1))  # (G*K, N): grid-major
    l2 = _penalties(np.repeat(PENALTY_GRID, CV_FOLDS))
    beta = newton_batch(np.broadcast_to(X, (G * CV_FOLDS, *X.shape[1:])), y, W, l2)
    z = np.einsum("nk,rk->rn", X[0], beta)
    out_loss = np.sum(np.tile(row_weight * held, (G, 1)) * (np.logaddexp(0.0, z) - y * z), axis=1)
    penalty = float(PENALTY_GRID[np.argmin(out_loss.reshape(G, CV_FOLDS).sum(axis=1))])
    # 2. the full-data fit
    theta, gamma, slope = newton_batch(X, y, row_weight[None], _penalties(np.array([penalty])))[0]
    lc = 100.0 * float(np.mean(expit(theta + slope * difficulty)))
    # 3. bootstrap over prompts, warm-started from the full fit
    ci = None
    if counts is not None and len(counts):
        B = counts.shape[0]
        boot = newton_batch(design(counts), y, row_weight * counts[:, prompt_of], _penalties(np.full(B, penalty)),
                            start=np.tile([theta, gamma, slope], (B, 1)))
        boot_lc = 100.0 * np.sum(counts * expit(boot[:, :1] + boot[:, 2:] * difficulty), axis=1) / P
        tail = (1.0 - level) / 2.0
        ci = [float(v) for v in np.quantile(boot_lc, [tail, 1.0 - tail])]
    spread = float(scaled_tanh(delta[None])[1][0, 0])
    identifiable, note = identifiability(delta, spread, has_anchors=A > 0)
    note = " ".join(n for n in (note, few_prompts_note(P)) if n) or None
    return JointLC(lc_win_rate=lc, lc_ci=ci, theta=float(theta), gamma=float(gamma),
                   difficulty_slope=float(slope), length_std=spread, penalty=penalty,
                   lc_identifiable=identifiable, lc_note=note)


def _penalties(penalty: np.ndarray) -> np.ndarray:
    """(R, 3) precisions of (theta, gamma, beta): theta only THETA_L2, the others `penalty`."""
    return np.column_stack([np.full(penalty.size, THETA_L2), penalty, penalty])


# Under this many prompts an LC fit (three coefficients) and its bootstrap interval say little.
MIN_PROMPTS = 10


def few_prompts_note(n_prompts: int) -> str | None:
    """A warning when the LC win rate and its interval come from fewer than MIN_PROMPTS prompts."""
    if n_prompts >= MIN_PROMPTS:
        return None
    return (f"Fitted on {n_prompts} prompts (fewer than {MIN_PROMPTS}): the LC win rate and its interval "
            "are not reliable; use more eval prompts.")


def identifiability(delta: np.ndarray, spread: float, has_anchors: bool = False) -> tuple[bool, str | None]:
    """Whether the length effect can be told apart from quality, with a note when not.

    Not identifiable from the model's own rows when all length differences are equal (s = 0)
    or one-sided (longer or shorter on at least ONE_SIDED_SHARE of prompts: delta = 0 is never
    observed, so LC extrapolates along the length slope). Length anchors pin that slope, which
    makes the extrapolation a measured one: identifiable, with a note. Strict shares keep the
    rule symmetric under swapping model and baseline.
    """
    if spread == 0.0 or not math.isfinite(spread):
        return False, ("All length differences are equal, so a length effect cannot be separated from "
                       "quality; the LC win rate falls back to the raw win rate.")
    for share, word in ((np.mean(delta > 0), "longer"), (np.mean(delta < 0), "shorter")):
        if share >= ONE_SIDED_SHARE:
            if has_anchors:
                return True, (f"The model is {word} than the baseline on {share:.0%} of prompts; the length "
                              "slope that LC extrapolates along is pinned by the length anchors.")
            return False, (f"The model is {word} than the baseline on {share:.0%} of prompts, so equal "
                           "lengths are never observed and the LC win rate is an extrapolation set "
                           "mostly by the regularisation (no length anchors).")
    return True, None


def joint_lc(preferences_by_model: dict[str, np.ndarray], lengths_by_model: dict[str, np.ndarray],
             baseline_lengths: np.ndarray, *, anchors: dict[str, tuple] | None = None,
             anchor_weight: float = ANCHOR_WEIGHT, n_boot: int = 200, seed: int = 0,
             level: float = 0.95, score_anchors: bool = False) -> dict[str, JointLC]:
    """LC win rate of every model, fitted jointly (module docstring), with a bootstrap interval.

    preferences_by_model / lengths_by_model: {name: (P,)} on the same prompts in the same order;
    anchors: {name: (preferences, lengths)} of baseline variants judged against the baseline. As
    AlpacaEval's gamed variants, an anchor is also a model of its own: a name in both is scored
    from its own rows plus every anchor's (its own included), and with score_anchors every anchor
    gets an LC entry that way. n_boot = 0 skips the interval (lc_ci None). Seeded: same inputs,
    same numbers.
    """
    anchors = anchors or {}
    models = dict(preferences_by_model)
    lengths_of = dict(lengths_by_model)
    for a in set(anchors) & set(models):
        if not (np.array_equal(anchors[a][0], models[a]) and np.array_equal(anchors[a][1], lengths_of[a])):
            raise ValueError(f"anchor {a!r} is also a model but with other preferences or lengths")
    extra = [a for a in anchors if a not in models]  # anchors that are not also models
    for a in extra:
        models[a], lengths_of[a] = anchors[a]
    names = list(models)  # every series once: the models, then the other anchors
    scored = names if score_anchors else list(preferences_by_model)
    base = np.asarray(baseline_lengths, dtype=float)
    prefs = np.array([models[n] for n in names], dtype=float)
    delta = np.array([lengths_of[n] for n in names], dtype=float) - base  # (S, P)
    features, _ = scaled_tanh(delta)
    index = {n: i for i, n in enumerate(names)}
    difficulty, _ = instruction_difficulty(prefs, features[0], [index[n] for n in scored], seed)
    rows = [index[a] for a in anchors]  # anchor rows of every fit
    P = base.size
    counts = None
    if n_boot > 0:
        counts = np.random.default_rng(seed).multinomial(P, np.full(P, 1.0 / P), size=n_boot).astype(float)
    return {name: fit_one_model(prefs[index[name]], delta[index[name]], difficulty[k], prefs[rows], delta[rows],
                                anchor_weight=anchor_weight, counts=counts, level=level, seed=seed)
            for k, name in enumerate(scored)}

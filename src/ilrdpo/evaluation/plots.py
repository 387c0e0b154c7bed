"""The report's figures, drawn from plain per-run data (no run directories, no RunData).

Every function takes dicts keyed by run name, in the order the runs were given, draws one PNG
and returns False without writing anything when there is nothing to draw. Several runs share
one set of axes (one line per run) so that vanilla iterative DPO and iLR-DPO can be read off
the same picture; figures with one panel per run share their axes for the same reason.

The figures are built on matplotlib.figure.Figure with an explicit Agg canvas rather than
pyplot: no display is needed, and no global pyplot state leaks between calls or threads.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ilrdpo.files import atomic_write_bytes

Rows = dict[str, list[dict]]  # run name -> summary rows (see report.summary_rows)
RUN_COLOURS = colormaps["tab10"]
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
HIST_COLOURS = ("#7f7f7f", "#d62728")  # first model grey, last model red, in every panel


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of one row key, leaving out the iterations where it is missing."""
    pairs = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _line(ax, rows: list[dict], key: str, style: str, **kwargs) -> None:
    """Plot one row key against iteration; a run without that number adds no empty legend entry."""
    xs, ys = _series(rows, key)
    if xs:
        ax.plot(xs, ys, style, **kwargs)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _figure(ncols: int = 1, width: float = 5.5, sharey: bool = False) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, sharex=True, sharey=sharey, squeeze=False)[0]
    return fig, list(axes)


def _iteration_axis(ax) -> None:
    ax.set_xlabel("iteration (0 = initial model)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig: Figure, path: Path) -> bool:
    """Drawn in memory, written atomically: a full disk leaves no half a PNG (and is one line)."""
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    atomic_write_bytes(path, image.getvalue())
    return True


def plot_reward_winrate(rows_by_run: Rows, path: Path) -> bool:
    """Left: mean judge reward of the eval answers, or of the training samples in a run without
    eval prompts (and quality, when a length bias separates them). Right: LC win rate vs the
    initial model (solid) and raw win rate with its 95% CI (dashed)."""
    if not any(_series(rows, "reward")[0] or _series(rows, "win_rate")[0] for rows in rows_by_run.values()):
        return False
    fig, (ax_reward, ax_win) = _figure(2)
    for i, (name, rows) in enumerate(rows_by_run.items()):
        colour = RUN_COLOURS(i % 10)
        sampled = " (training samples)" if any(r["source"] == "samples" for r in rows) else ""
        _line(ax_reward, rows, "reward", "o--" if sampled else "o-", color=colour,
              label=f"{name} reward{sampled}")
        if any(r["quality"] != r["reward"] for r in rows if r["quality"] is not None):
            _line(ax_reward, rows, "quality", "s:", color=colour, label=f"{name} quality{sampled}")
        _line(ax_win, rows, "lc_win_rate", "o-", color=colour, label=f"{name} LC")
        with_ci = [r for r in rows if r.get("win_rate") is not None and r.get("win_rate_ci")]
        if with_ci:
            raw = np.array([r["win_rate"] for r in with_ci])
            ci = np.array([r["win_rate_ci"] for r in with_ci]).T  # (2, n): lo, hi
            ax_win.errorbar([r["iteration"] for r in with_ci], raw, yerr=np.abs(ci - raw),
                            fmt="x--", color=colour, alpha=0.6, capsize=3, label=f"{name} raw (95% CI)")
    ax_win.axhline(50, color="grey", lw=0.8)
    ax_reward.set(title="judge reward", ylabel="mean reward")
    ax_win.set(title="win rate vs initial model", ylabel="win rate (%)", ylim=(-2, 102))
    for ax in (ax_reward, ax_win):
        _iteration_axis(ax)
        _legend(ax)
    return _save(fig, path)


def plot_length(rows_by_run: Rows, path: Path) -> bool:
    """Mean answer length per iteration; dashed where it comes from training samples."""
    if not any(_series(rows, "length_tokens")[0] for rows in rows_by_run.values()):
        return False
    fig, (ax,) = _figure()
    for i, (name, rows) in enumerate(rows_by_run.items()):
        sampled = any(r["source"] == "samples" for r in rows)
        _line(ax, rows, "length_tokens", "o--" if sampled else "o-", color=RUN_COLOURS(i % 10),
              label=f"{name} (training samples)" if sampled else name)
    ax.set(title="mean answer length", ylabel="tokens")
    _iteration_axis(ax)
    _legend(ax)
    return _save(fig, path)


def plot_alpha(rows_by_run: Rows, path: Path) -> bool:
    """The length-margin weight alpha each iteration trained with (constant or automatic)."""
    if not any(_series(rows, "alpha")[0] for rows in rows_by_run.values()):
        return False
    fig, (ax,) = _figure()
    for i, (name, rows) in enumerate(rows_by_run.items()):
        _line(ax, rows, "alpha", "o-", color=RUN_COLOURS(i % 10), label=name)
    ax.set(title="alpha (length margin weight) per iteration", ylabel="alpha")
    _iteration_axis(ax)
    _legend(ax)
    return _save(fig, path)


def plot_reward_vs_length(points_by_run: dict[str, dict[int, tuple[Sequence[float], Sequence[float]]]],
                          sources: dict[str, str], path: Path) -> bool:
    """One panel per run (shared axes): reward against length of each answer, one colour per
    iteration. `points_by_run[name][k]` = (n_tokens, rewards) of model k's answers."""
    if not any(lengths for points in points_by_run.values() for lengths, _ in points.values()):
        return False
    iterations = sorted({k for points in points_by_run.values() for k in points})
    cmap = colormaps["viridis"]
    colour = {k: cmap(i / max(len(iterations) - 1, 1)) for i, k in enumerate(iterations)}
    fig, axes = _figure(len(points_by_run), width=4.5, sharey=True)
    for ax, (name, points) in zip(axes, points_by_run.items()):
        for k, (lengths, rewards) in sorted(points.items()):
            # A marker per iteration too: answers of equal length and reward would hide each other.
            ax.scatter(lengths, rewards, s=22, alpha=0.7, color=colour[k], marker=MARKERS[k % len(MARKERS)],
                       label=f"iter {k}")
        what = "eval answers" if sources.get(name) == "eval" else "training samples"
        ax.set(title=f"{name}: {what}", xlabel="answer length (tokens)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend(ax)
    axes[0].set_ylabel("reward")
    return _save(fig, path)


def plot_length_hist(lengths_by_run: dict[str, dict[str, Sequence[int]]], path: Path) -> bool:
    """One panel per run (shared axes and bins): length histograms of the first and the last
    model. `lengths_by_run[name]` maps a label (e.g. "iter 0") to answer lengths in tokens."""
    everything = [n for groups in lengths_by_run.values() for values in groups.values() for n in values]
    if not everything:
        return False
    low, high = min(everything), max(everything)
    # Integer-aligned bins while the range is small, so each token count is one bar.
    bins = np.arange(low, high + 2) - 0.5 if high - low <= 40 else np.linspace(low, high, 31)
    fig, axes = _figure(len(lengths_by_run), width=4.5, sharey=True)
    for ax, (name, groups) in zip(axes, lengths_by_run.items()):
        for j, (label, values) in enumerate(groups.items()):
            # The last model as an outline over the filled first one: identical bars stay visible.
            style = {"alpha": 0.5} if j == 0 else {"histtype": "step", "linewidth": 2}
            ax.hist(values, bins=bins, color=HIST_COLOURS[j % 2], label=f"{label} (n={len(values)})", **style)
        ax.set(title=name, xlabel="answer length (tokens)", xlim=(bins[0] - 1, bins[-1] + 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend(ax)
    axes[0].set_ylabel("answers")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


TITLES = {
    "reward_winrate.png": "Judge reward and win rate vs the initial model",
    "length.png": "Mean answer length",
    "reward_vs_length.png": "Reward against length of each answer",
    "length_hist.png": "Answer lengths of the first and the last model",
    "alpha.png": "Alpha per iteration",
    "training.png": "Training curves (every optimizer step of every iteration)",
}


TRAINING_PANELS = {"loss": "loss", "rewards/accuracies": "pair accuracy", "rewards/margins": "reward margin",
                   "length/margin_term": "length term (logits)"}


def plot_training(steps_by_run: dict[str, dict[int, list[dict]]], path: Path, note: str | None = None) -> bool:
    """Training curves per optimizer step, one global step axis across iterations (dotted lines
    where an iteration's round starts): loss, pair accuracy, reward margin, length term; `note`
    is printed under the panels (what an IPO loss curve means)."""
    if not any(steps for by_k in steps_by_run.values() for steps in by_k.values()):
        return False
    fig, axes = _figure(len(TRAINING_PANELS), width=4.0)
    for name, by_k in steps_by_run.items():
        offset, xs, series, starts = 0, [], {key: [] for key in TRAINING_PANELS}, []
        for _, steps in sorted(by_k.items()):
            starts.append(offset)
            for row in steps:
                xs.append(offset + row.get("step", 0))
                for key in TRAINING_PANELS:
                    series[key].append(row.get(key, float("nan")))
            offset += len(steps)
        for ax, key in zip(axes, TRAINING_PANELS):
            ax.plot(xs, series[key], "-", lw=1, label=name)
            for start in starts[1:]:
                ax.axvline(start + 0.5, color="grey", ls=":", lw=0.8)
    for ax, title in zip(axes, TRAINING_PANELS.values()):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step (all iterations)")
        ax.grid(alpha=0.3)
    _legend(axes[0])
    if note:
        fig.text(0.01, -0.02, note, fontsize=7, va="top", wrap=True)
    return _save(fig, path)


def draw_all(plots_dir: Path, rows_by_run: Rows, points_by_run: dict, sources: dict[str, str],
             lengths_by_run: dict, steps_by_run: dict | None = None,
             training_note: str | None = None) -> tuple[dict[str, Path], list[str]]:
    """Every figure of the report; returns {file name: path} of those drawn and a line for each
    one left out for lack of data."""
    draw = {
        "reward_winrate.png": lambda path: plot_reward_winrate(rows_by_run, path),
        "length.png": lambda path: plot_length(rows_by_run, path),
        "reward_vs_length.png": lambda path: plot_reward_vs_length(points_by_run, sources, path),
        "length_hist.png": lambda path: plot_length_hist(lengths_by_run, path),
        "alpha.png": lambda path: plot_alpha(rows_by_run, path),
        "training.png": lambda path: plot_training(steps_by_run or {}, path, training_note),
    }
    drawn, skipped = {}, []
    for file_name, plot in draw.items():
        path = plots_dir / file_name
        path.unlink(missing_ok=True)  # a stale picture from an earlier report must not survive
        if plot(path):
            drawn[file_name] = path
        else:
            skipped.append(f"plots/{file_name}: no data to draw")
    return drawn, skipped


Bands = dict[str, dict[int, Sequence[float]]]  # arm -> iteration -> one value per seed


def plot_bands(panels: dict[str, Bands], path: Path, title: str = "") -> bool:
    """A multi-seed study: one panel per measure, per arm the mean over seeds as a line and the
    range over seeds (min to max) as a band; panels are {panel title: Bands}."""
    panels = {name: bands for name, bands in panels.items() if any(bands.values())}
    if not panels:
        return False
    fig, axes = _figure(ncols=len(panels), width=4.5)
    for ax, (panel, bands) in zip(axes, panels.items()):
        for i, (arm, by_iteration) in enumerate(bands.items()):
            xs = sorted(k for k, values in by_iteration.items() if len(values))
            if not xs:
                continue
            values = [np.asarray(by_iteration[k], dtype=float) for k in xs]
            colour = RUN_COLOURS(i % 10)
            n_seeds = max(len(v) for v in values)
            ax.plot(xs, [v.mean() for v in values], "o-", color=colour, label=f"{arm} (mean of {n_seeds})")
            ax.fill_between(xs, [v.min() for v in values], [v.max() for v in values], color=colour, alpha=0.2)
        ax.set(title=panel)
        _iteration_axis(ax)
        _legend(ax)
    if title:
        fig.suptitle(f"{title} (band: min to max over seeds)", fontsize=10)
    return _save(fig, path)

"""The report stage: read run directories, tabulate every iteration, draw plots, write report.md.

A run directory is read as it is on disk, finished or not. Whatever is absent (a run without
eval prompts, iterations still to come, a stage killed half-way, an unreadable file) is listed
under "Missing" instead of stopping the report.

Iteration k below always means the model after k rounds (0 = the initial model). Its eval
answers live in iter_k/, but its *training samples* live in iter_{k+1}/candidates.jsonl,
because round k+1 samples from model k. Runs without eval prompts fall back to those samples.

summary_rows() is the single source of every number in the results table: the markdown table
and the rich table both format its rows through TABLE_COLUMNS. Win rates vs the initial model
are recomputed from the eval answers on disk by one joint fit per baseline (joint_win_rates):
every iteration of every run whose initial model gave the same eval answers is fitted together,
with the initial model's length anchors when iter_0 has them; eval.json is the fallback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from ilrdpo.decisions import judge_tie_tolerance
from ilrdpo.evaluation import plots
from ilrdpo.evaluation.compare import compare_all
from ilrdpo.evaluation.lc import ANCHOR_WEIGHT
from ilrdpo.evaluation.rundata import RunData, load_runs
from ilrdpo.evaluation.sections import (
    fmt,
    markdown_table,
    target_loss_note,
    text_section,
    training_section,
)
from ilrdpo.files import atomic_write_text
from ilrdpo.progress import console

# --- numbers -------------------------------------------------------------------------------------


def model_answers(run: RunData, k: int) -> dict[str, list]:
    """n_tokens, reward and quality of model k's answers: its eval answers, or in a run without
    eval prompts its training samples (iter_{k+1}/candidates.jsonl, sampled from model k).
    Samples not yet scored have None rewards."""
    if run.source == "eval":
        rows = run.answers.get(k, [])
        return {key: [r.get(key) for r in rows] for key in ("n_tokens", "reward", "quality")}
    rows = run.candidates.get(k + 1, [])
    unscored = lambda r: [None] * len(r["n_tokens"])
    return {"n_tokens": [n for r in rows for n in r["n_tokens"]],
            "reward": [x for r in rows for x in r.get("rewards") or unscored(r)],
            "quality": [x for r in rows for x in r.get("quality") or unscored(r)]}


def _mean(values: list) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


Joint = dict[tuple[str, int], dict[str, dict[str, Any]]]


def joint_win_rates(runs: list[RunData]) -> Joint:
    """{(run name, k): {"reward": ..., "quality": ...}} win rates of model k vs its run's model 0.

    Runs whose model 0 gave the same eval answers share a baseline; all their iterations k >= 1
    are fitted in one joint LC fit (compare_all), with that baseline's length anchors if any run
    of the group has them, ties by the evaluate stage's rule (decisions.judge_tie_tolerance). A
    group whose answers cannot be compared is left out: summary_rows falls back to eval.json."""
    groups: list[tuple[list[dict], list[RunData]]] = []
    for run in runs:
        if run.source != "eval" or 0 not in run.answers:
            continue
        key = [(r["id"], r.get("response")) for r in run.answers[0]]
        for baseline, members in groups:
            if [(r["id"], r.get("response")) for r in baseline] == key:
                members.append(run)
                break
        else:
            groups.append((run.answers[0], [run]))
    out: Joint = {}
    for baseline, members in groups:
        models = {(run.name, k): rows for run in members for k, rows in run.answers.items() if k > 0}
        if not models:
            continue
        anchors = next((run.anchors for run in members if run.anchors), {})
        tie = judge_tie_tolerance((members[0].config.get("eval") or {}).get("judge"), members[0].config.get("scoring"))
        try:
            fits = compare_all({f"{i}": rows for i, rows in enumerate(models.values())}, baseline,
                               anchors=anchors, tie_tolerance=tie)
        except (KeyError, TypeError, ValueError):
            continue
        out.update({name: fits[f"{i}"] for i, name in enumerate(models)})
    return out


def summary_rows(run: RunData, joint: Joint | None = None) -> list[dict[str, Any]]:
    """One row per model: the numbers of the results table, None where not available.

    Win rates come from `joint` (joint_win_rates) where it has the model, else eval.json;
    eval.json is the source of the other means, and where it is absent (eval cut short, or no
    eval prompts) they are taken over the answers on disk, `source` saying which answers."""
    rows = []
    for k in run.iterations:
        ev = run.evals.get(k, {})
        fitted = (joint or {}).get((run.name, k))
        vs = fitted["reward"] if fitted else ev.get("vs_initial") or {}
        vs_quality = fitted["quality"] if fitted else ev.get("vs_initial_quality") or {}
        on_disk = {key: _mean(values) for key, values in model_answers(run, k).items()}
        rows.append({
            "run": run.name, "iteration": k, "alpha": run.alpha.get(k), "source": run.source,
            "length_tokens": (ev.get("length") or {}).get("tokens_mean", on_disk["n_tokens"]),
            "truncated_share": (ev.get("length") or {}).get("truncated_share"),
            "quality": ev.get("quality_mean", on_disk["quality"]),
            "reward": ev.get("reward_mean", on_disk["reward"]),
            "win_rate": vs.get("win_rate"), "win_rate_ci": vs.get("win_rate_ci"),
            "lc_win_rate": vs.get("lc_win_rate"), "lc_ci": vs.get("lc_ci"),
            "lc_identifiable": vs.get("lc_identifiable"), "lc_note": vs.get("lc_note"),
            "quality_win_rate": vs_quality.get("win_rate"),
            "pairs": ev.get("pairs/count", run.pairs_count.get(k)),
            **_sampled_numbers(ev.get("sampled") or {}),
        })
    return rows


def _sampled_numbers(sampled: dict[str, Any]) -> dict[str, Any]:
    """The eval.json "sampled" figures (experimental.eval_samples > 0) a results row shows; None where absent."""
    vs = sampled.get("vs_initial") or {}
    return {"sampled_length": (sampled.get("length") or {}).get("tokens_mean"),
            "sampled_quality": sampled.get("quality_mean"), "sampled_win_rate": vs.get("win_rate"),
            "sampled_lc_win_rate": vs.get("lc_win_rate")}


def _win_cell(row: dict) -> str:
    if row["win_rate"] is None:
        return "–"
    ci = row["win_rate_ci"]
    return f"{row['win_rate']:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def _sampled(key: str, spec: str) -> Callable[[dict], str]:
    """Cell of a number that may come from training samples (marked †) rather than eval answers."""
    return lambda r: fmt(r[key], spec) + ("†" if r["source"] == "samples" and r[key] is not None else "")


def _lc_cell(row: dict) -> str:
    if row["lc_win_rate"] is None:
        return "–"
    ci = row.get("lc_ci")
    return (f"{row['lc_win_rate']:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
            + ("‡" if row["lc_identifiable"] is False else ""))


# (header in report.md, short header for the terminal, cell of a summary row)
TABLE_COLUMNS: list[tuple[str, str, Callable[[dict], str]]] = [
    ("iteration", "iter", lambda r: str(r["iteration"])),
    ("alpha", "alpha", lambda r: fmt(r["alpha"], ".3g")),
    ("mean length (tokens)", "length", _sampled("length_tokens", ".1f")),
    ("quality", "quality", _sampled("quality", ".4g")),
    ("reward", "reward", _sampled("reward", ".4g")),
    ("win rate vs initial [95% CI]", "win % [95% CI]", _win_cell),
    ("LC win rate vs initial [95% CI]", "LC win % [95% CI]", _lc_cell),
    ("quality win rate vs initial", "q. win %", lambda r: fmt(r["quality_win_rate"], ".1f")),
    ("pairs", "pairs", lambda r: fmt(r["pairs"], "d")),
]
# Shown when some model has sampled eval answers (experimental.eval_samples): the same figures over them.
SAMPLED_COLUMNS: list[tuple[str, str, Callable[[dict], str]]] = [
    ("sampled length", "s. length", lambda r: fmt(r["sampled_length"], ".1f")),
    ("sampled quality", "s. quality", lambda r: fmt(r["sampled_quality"], ".4g")),
    ("sampled win rate vs initial", "s. win %", lambda r: fmt(r["sampled_win_rate"], ".1f")),
    ("sampled LC win rate vs initial", "s. LC win %", lambda r: fmt(r["sampled_lc_win_rate"], ".1f")),
]
# Marks are not "*": a markdown line starting with "* " would turn into a bullet list.
FOOTNOTES = {
    "‡": "‡ LC win rate not identifiable (see the notes on the LC win rate): an extrapolation set "
         "mostly by the prior.",
    "†": "† No eval prompts: mean over model k's training samples (candidates.jsonl of iteration k+1); "
         "the last model drew none.",
}


def table_cells(runs: list[RunData], short: bool = False,
                joint: Joint | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, formatted cells and footnotes of the results table; a run column when there are
    several runs. `joint` (joint_win_rates(runs)) is computed here when not given."""
    with_run = len(runs) > 1
    joint = joint_win_rates(runs) if joint is None else joint
    rows = [row for run in runs for row in summary_rows(run, joint)]
    columns = TABLE_COLUMNS + (SAMPLED_COLUMNS if any(r["sampled_length"] is not None for r in rows) else [])
    headers = (["run"] if with_run else []) + [c[1] if short else c[0] for c in columns]
    cells = [([row["run"]] if with_run else []) + [cell(row) for _, _, cell in columns] for row in rows]
    used = {"‡": any(r["lc_identifiable"] is False for r in rows),
            "†": any(r["source"] == "samples" for r in rows)}
    return headers, cells, [text for mark, text in FOOTNOTES.items() if used[mark]]


# --- rendering -----------------------------------------------------------------------------------


def _setting(run: RunData, section: str, key: str) -> Any:
    return (run.config.get(section) or {}).get(key)


def _study_section(runs: list[RunData], out_dir: Path) -> list[str]:
    """Runs that are trials of an `ilrdpo tune` study: the study, the trial's settings and objectives."""
    cells = [[run.name, _relative(Path(run.trial.get("study", "?")), out_dir), str(run.trial.get("trial", "?")),
              ", ".join(f"{k}={fmt(v)}" for k, v in run.trial.get("params", {}).items()),
              ", ".join(f"{k}: {fmt(v)}" for k, v in run.trial.get("objectives", {}).items())]
             for run in runs if run.trial]
    if not cells:
        return []
    return ["## From a hyperparameter study", "",
            "These runs are trials of `ilrdpo tune`; the study's plots and best settings are in its folder.", "",
            *markdown_table(["run", "study", "trial", "settings", "objectives"], cells), ""]


def _runs_section(runs: list[RunData], out_dir: Path) -> list[str]:
    cells = []
    for run in runs:
        control = _setting(run, "iterations", "alpha_control") or {}
        control = "auto" if control.get("mode", "auto" if control.get("budget") is not None else None) == "auto" else None
        last = max((k for k in run.dirs if k > 0), default=0)
        cells.append([run.name, _relative(run.path, out_dir), str(_setting(run, "loss", "type") or "–"),
                      fmt(_setting(run, "loss", "alpha"), "g") + (f" ({control})" if control else ""),
                      str(_setting(run, "iterations", "reference") or "–"),
                      f"{last} / {_setting(run, 'iterations', 'count') or '?'}"])
    headers = ["run", "folder", "loss", "alpha (control)", "reference", "iterations on disk"]
    return ["## Runs", "", *markdown_table(headers, cells), ""]


def anchor_sentence(joint: Joint) -> str:
    """How the joint LC fits used length anchors, in one sentence ("" without a joint fit)."""
    if not joint:
        return ""
    used = sorted({a for fits in joint.values() for fit in fits.values() for a in fit.get("lc_anchors") or ()})
    if not used:
        return ("No length anchors (eval.length_anchors off): the length slope of a model longer or shorter "
                "than the initial one on nearly every prompt rests on the regularisation (‡).")
    return (f"The length anchors ({', '.join(used)}: the initial model told to be so) enter every fit as "
            "AlpacaEval 2.0's gamed baselines do: rows without the quality term, weight "
            f"{ANCHOR_WEIGHT / len(used):g} each per prompt, length feature scaled by their own spread; they pin "
            "the length slope of models much shorter or longer than the initial one.")


def _lc_notes(runs: list[RunData], joint: Joint) -> list[str]:
    """Each distinct lc_note once, followed by the runs, iterations and comparisons it applies to
    (vs_initial from the joint fit where there is one, the rest from eval.json)."""
    where: dict[str, dict[str, dict[int, list[str]]]] = {}
    for run in runs:
        for k, ev in sorted(run.evals.items()):
            fitted = joint.get((run.name, k))
            for key in ("vs_initial", "vs_initial_quality", "vs_previous", "vs_previous_quality"):
                source = ev.get(key) or {}
                if fitted and key.startswith("vs_initial"):
                    source = fitted["quality" if key.endswith("quality") else "reward"]
                if note := source.get("lc_note"):
                    where.setdefault(note, {}).setdefault(run.name, {}).setdefault(k, []).append(key)
    if not where:
        return []
    lines = ["## Notes on the LC win rate", ""]
    for note, by_run in where.items():
        lines.append(f"- {note}")
        lines += [f"  - {name}: " + "; ".join(f"iter {k} ({', '.join(keys)})" for k, keys in by_k.items())
                  for name, by_k in by_run.items()]
    return lines + [""]


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # different drives on Windows
        return str(path)


# --- plots ---------------------------------------------------------------------------------------

def draw_plots(runs: list[RunData], plots_dir: Path, joint: Joint | None = None) -> tuple[dict[str, Path], list[str]]:
    """Gather each figure's data from the runs and draw them all (see plots.draw_all)."""
    joint = joint_win_rates(runs) if joint is None else joint
    answers = {run.name: {k: model_answers(run, k) for k in run.iterations} for run in runs}
    # samples not yet scored have lengths but no rewards to plot
    points = {name: {k: (a["n_tokens"], a["reward"]) for k, a in by_k.items() if a["n_tokens"]
                     and None not in a["reward"]} for name, by_k in answers.items()}
    hists = {}
    for name, by_k in answers.items():
        with_lengths = [k for k, a in by_k.items() if a["n_tokens"]]
        ends = sorted({with_lengths[0], with_lengths[-1]}) if with_lengths else []
        hists[name] = {f"iter {k}": by_k[k]["n_tokens"] for k in ends}
    return plots.draw_all(plots_dir, {run.name: summary_rows(run, joint) for run in runs}, points,
                          {run.name: run.source for run in runs}, hists, {run.name: run.metrics for run in runs},
                          target_loss_note(runs))


# --- entry points --------------------------------------------------------------------------------


def render_markdown(runs: list[RunData], drawn: dict[str, Path], skipped: list[str], out_dir: Path,
                    joint: Joint | None = None) -> str:
    joint = joint_win_rates(runs) if joint is None else joint
    headers, cells, footnotes = table_cells(runs, joint=joint)
    lines = [f"# iLR-DPO report: {' vs '.join(run.name for run in runs)}", "", *_runs_section(runs, out_dir),
             *_study_section(runs, out_dir),
             "## Results per iteration", "",
             ("Iteration k is the model after k rounds (0 = initial). Win rates are percentages of eval "
              "prompts on which the judge's reward prefers model k over the initial model (ties count "
              "half); the quality win rate uses the judge's own score (without a judge's length bonus, as the demo's has). The LC win rate "
              "(docs/lc.md) is one joint fit over every model shown that shares an initial model, with a "
              "95% bootstrap interval over prompts. " + anchor_sentence(joint)).rstrip(), "",
             *markdown_table(headers, cells), ""]
    lines += [line for note in footnotes for line in (note, "")]
    lines += _lc_notes(runs, joint) + text_section(runs) + training_section(runs)
    if drawn:
        lines += ["## Plots", ""]
        for file_name, path in drawn.items():
            title = plots.TITLES[file_name]
            lines += [f"### {title}", "", f"![{title}]({_relative(path, out_dir)})", ""]
    missing = [f"{run.name}: {item}" for run in runs for item in run.missing] + skipped
    lines += ["## Missing", ""] + ([f"- {item}" for item in missing] or ["Nothing is missing."])
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[Path], out_dir: Path, names: list[str] | None = None) -> Path:
    """`ilrdpo report`: out_dir/report.md and out_dir/plots/*.png for one or more runs."""
    runs = load_runs([Path(p) for p in run_dirs], names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    joint = joint_win_rates(runs)  # one joint LC fit per baseline, shared by table, notes and plots
    drawn, skipped = draw_plots(runs, out_dir / "plots", joint)
    report = out_dir / "report.md"
    atomic_write_text(report, render_markdown(runs, drawn, skipped, out_dir, joint))
    return report


def _no_interval(text: str) -> str:
    return re.sub(r"\s*\[[^\]]*\]", "", text)


def print_tables(runs: list[RunData]) -> None:
    """The results table (same cells as report.md) and what is missing, on the stderr console."""
    headers, cells, footnotes = table_cells(runs, short=True)
    if console.width < 100:  # an 80-column terminal: the 95% intervals stay in report.md
        headers, cells = [_no_interval(h) for h in headers], [[_no_interval(c) for c in row] for row in cells]
        footnotes = [*footnotes, "95% intervals of the win rates: report.md"]
    # Cells wrap rather than truncate on a narrow console: an ellipsis would hide digits.
    table = Table(title="iLR-DPO runs", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for header in headers:
        table.add_column(header, justify="left" if header == "run" else "right", overflow="fold")
    for row in cells:
        table.add_row(*(escape(c) for c in row))
    console.print(table)
    for note in footnotes:
        console.print(f"[dim]{escape(note)}[/dim]")
    for run in runs:
        for item in run.missing:
            console.print(f"[yellow]missing[/yellow] {escape(run.name)}: {escape(item)}")

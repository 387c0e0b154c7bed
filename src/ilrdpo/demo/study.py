"""The demo over several seeds: every arm's length and quality per iteration, mean and spread.

`ilrdpo demo --seeds 0,1,2` runs the demo once per seed into seed_{s}/ and then writes
study.md (one row per arm and iteration: mean and min..max over seeds of the eval length,
quality, LC win rate and saturated share, and the same on the second held-out set with
ROUGE-L and chrF) and study_*.png (means with bands). study.json holds every seed's numbers.

The claim the demo makes (issue 12) is checked here, per eval set, against the base model
(iteration 0) and the vanilla arm:
    iLR-DPO mean length within 15% of the base's at every iteration, every seed within 25%;
    iLR-DPO mean quality >= the base's mean (averaged over iterations 1..T) and >= vanilla's
    mean at every iteration; vanilla's mean length >= 1.25 x the base's at every iteration.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ilrdpo.evaluation.compare import per_prompt_means
from ilrdpo.files import atomic_write_text, read_jsonl_tolerant
from ilrdpo.rundir import SAMPLES_FILE, RunDir

SETS = {"eval": "bundled eval prompts", "heldout": "second held-out set",
        "sampled": "bundled eval prompts, sampled answers"}  # the last with experimental.eval_samples > 0 only
VANILLA, METHOD = "idpo", "ilrdpo"  # the arms' folder names
# The arms as the README, tables, plots and terminal name them (the folders keep the short names).
ARM_NAMES = {VANILLA: "vanilla", METHOD: "iLR-DPO"}


def arm_name(arm: str) -> str:
    return ARM_NAMES.get(arm, arm)
MIN_SEEDS = 3


def _eval_numbers(run_dir: Path, k: int) -> dict[str, float | None]:
    rundir = RunDir(run_dir)
    path = rundir.file(k, "eval.json")
    if not path.exists():
        return {}
    ev = json.loads(path.read_text())
    metrics = read_jsonl_tolerant(rundir.file(k, "metrics.jsonl")) if k else []
    saturated = [m["length/saturated_share"] for m in metrics if "length/saturated_share" in m]
    reversed_ = [m["length/reversed_share"] for m in metrics if "length/reversed_share" in m]
    state = json.loads(rundir.state_path.read_text())
    sampled = ev.get("sampled") or {}
    return {"eval_length": ev["length"]["tokens_mean"], "eval_quality": ev["quality_mean"],
            "sampled_length": (sampled.get("length") or {}).get("tokens_mean"),
            "sampled_quality": sampled.get("quality_mean"),
            "eval_reward": ev["reward_mean"], "eval_lc": (ev.get("vs_initial") or {}).get("lc_win_rate"),
            "sample_length": ev.get("gen/length_mean"),
            "saturated_share": statistics.fmean(saturated) if saturated else None,
            "reversed_share": statistics.fmean(reversed_) if reversed_ else None,
            "alpha": state.get("alpha", {}).get(str(k)),
            "trainings": 1 + len(state.get("attempts", {}).get(str(k), [])) if k else None}


def _heldout_numbers(run_dir: Path, k: int) -> dict[str, float | None]:
    path = RunDir(run_dir).heldout(k)
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    return {"heldout_length": summary["length"]["tokens_mean"], "heldout_quality": summary["quality_mean"],
            "heldout_rougeL": summary["text"].get("rougeL"), "heldout_chrf": summary["text"].get("chrf")}


def collect(out: Path, seeds: list[int], arms: list[str]) -> list[dict[str, Any]]:
    """One row per (arm, seed, iteration) with every number the study reports."""
    rows = []
    for seed in seeds:
        for arm in arms:
            run_dir = out / f"seed_{seed}" / arm
            k = 0
            while RunDir(run_dir).file(k, "eval.json").exists():
                rows.append({"arm": arm, "seed": seed, "iteration": k,
                             **_eval_numbers(run_dir, k), **_heldout_numbers(run_dir, k)})
                k += 1
    return rows


def by_iteration(rows: list[dict], arm: str, key: str) -> dict[int, list[float]]:
    """{iteration: [value per seed]} of one arm; iteration 0 (the shared base model) for every arm."""
    values: dict[int, list[float]] = {}
    for row in rows:
        if row["arm"] == arm and row.get(key) is not None:
            values.setdefault(row["iteration"], []).append(row[key])
    return values


def _relative_lengths(rows: list[dict], arm: str, key: str) -> dict[int, list[float]]:
    """Per iteration, each seed's length over that seed's base length, minus 1."""
    base = {r["seed"]: r[key] for r in rows if r["arm"] == arm and r["iteration"] == 0 and r.get(key)}
    out: dict[int, list[float]] = {}
    for row in rows:
        if row["arm"] == arm and row["iteration"] > 0 and row.get(key) is not None and row["seed"] in base:
            out.setdefault(row["iteration"], []).append(row[key] / base[row["seed"]] - 1)
    return out


def check_claim(rows: list[dict], prefix: str, vanilla: str = VANILLA, method: str = METHOD) -> list[str]:
    """Issue 12's conditions on one eval set ("eval" or "heldout"); one line per failure.
    Vanilla is compared on the seeds the method has at each iteration."""
    length, quality = f"{prefix}_length", f"{prefix}_quality"
    m_name, v_name = arm_name(method), arm_name(vanilla)
    seeds = {(r["iteration"], r["seed"]) for r in rows if r["arm"] == method and r.get(length) is not None}
    rows = [r for r in rows if r["arm"] != vanilla or (r["iteration"], r["seed"]) in seeds]
    method_rel, vanilla_rel = _relative_lengths(rows, method, length), _relative_lengths(rows, vanilla, length)
    method_q, vanilla_q = by_iteration(rows, method, quality), by_iteration(rows, vanilla, quality)
    if not method_rel or 0 not in method_q:
        return [f"{prefix}: no numbers"]
    failures = []
    base_q = statistics.fmean(method_q[0])
    later = [statistics.fmean(method_q[k]) for k in sorted(method_rel)]
    if statistics.fmean(later) < base_q:
        failures.append(f"{prefix}: mean quality {statistics.fmean(later):.4f} < base {base_q:.4f}")
    for k in sorted(method_rel):
        if len(method_rel[k]) < MIN_SEEDS:
            failures.append(f"{prefix} iter {k}: {len(method_rel[k])} seed(s), the claim needs {MIN_SEEDS}")
        mean_rel = statistics.fmean(method_rel[k])
        if abs(mean_rel) > 0.15:
            failures.append(f"{prefix} iter {k}: {m_name} mean length {mean_rel:+.0%} of base (limit 15%)")
        worst = max(method_rel[k], key=abs)
        if abs(worst) > 0.25:
            failures.append(f"{prefix} iter {k}: a seed's {m_name} length {worst:+.0%} of base (limit 25%)")
        if k in vanilla_q and statistics.fmean(method_q[k]) < statistics.fmean(vanilla_q[k]):
            failures.append(f"{prefix} iter {k}: {m_name} quality {statistics.fmean(method_q[k]):.4f} < "
                            f"{v_name} {statistics.fmean(vanilla_q[k]):.4f}")
        if k in vanilla_rel and statistics.fmean(vanilla_rel[k]) < 0.25:
            failures.append(f"{prefix} iter {k}: {v_name} length only {statistics.fmean(vanilla_rel[k]):+.0%}")
    return failures


COLUMNS = (("eval_length", "length", ".1f"), ("eval_quality", "quality", ".4f"), ("eval_lc", "LC win %", ".1f"),
           ("sampled_length", "sampled length", ".1f"), ("sampled_quality", "sampled quality", ".4f"),
           ("alpha", "alpha", ".4f"), ("trainings", "trainings", ".1f"),
           ("saturated_share", "saturated", ".2f"), ("reversed_share", "reversed", ".2f"),
           ("heldout_length", "held-out length", ".1f"),
           ("heldout_quality", "held-out quality", ".4f"), ("heldout_rougeL", "held-out ROUGE-L", ".1f"),
           ("heldout_chrf", "held-out chrF", ".1f"))


def _cell(values: list[float], spec: str) -> str:
    if not values:
        return "-"
    mean = format(statistics.fmean(values), spec)
    return mean if len(values) == 1 else f"{mean} ({format(min(values), spec)}..{format(max(values), spec)})"


def _present_sets(rows: list[dict]) -> dict[str, str]:
    return {prefix: name for prefix, name in SETS.items() if any(r.get(f"{prefix}_length") is not None for r in rows)}


def study_table(rows: list[dict], arms: list[str]) -> list[str]:
    """Markdown: per arm and iteration, mean (min..max over seeds) of each column that has numbers
    (the sampled columns only with experimental.eval_samples)."""
    columns = [c for c in COLUMNS if not c[0].startswith("sampled_") or any(r.get(c[0]) is not None for r in rows)]
    lines = ["| arm | iter | seeds | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for arm in arms:
        iterations = sorted({r["iteration"] for r in rows if r["arm"] == arm})
        for k in iterations:
            if k == 0 and arm != arms[0]:
                continue  # the base model: one row
            selected = [r for r in rows if r["arm"] == arm and r["iteration"] == k]
            cells = [_cell([r[key] for r in selected if r.get(key) is not None], spec) for key, _, spec in columns]
            lines.append(f"| {'base' if k == 0 else arm_name(arm)} | {k} | {len(selected)} | " + " | ".join(cells) + " |")
    return lines


ANSWER_FILES = {"eval": lambda run, k: run.file(k, "eval_answers.jsonl"),
                "heldout": lambda run, k: run.heldout(k, answers=True),
                "sampled": lambda run, k: run.file(k, SAMPLES_FILE)}


def prompt_qualities(run_dir: Path, k: int, prefix: str) -> dict[str, float]:
    """{prompt id: quality} of model k's answers on one set; the mean over a prompt's samples for
    "sampled"; {} when the file is absent."""
    rows = read_jsonl_tolerant(ANSWER_FILES[prefix](RunDir(run_dir), k))
    return {row["id"]: row["quality"] for row in per_prompt_means(rows, keys=("quality",))}


def paired_differences(out: Path, seeds: list[int], prefix: str, method: str = METHOD, vanilla: str = VANILLA,
                       n_boot: int = 4000) -> list[dict[str, Any]]:
    """Per iteration: the method's quality minus vanilla's, prompt by prompt on the seeds both have,
    its mean and a 95% percentile-bootstrap interval that resamples prompts (each with all its
    seeds), so the spread between prompts, not only between seeds, sets the interval."""
    import numpy as np

    rows = []
    k = 1
    while True:
        per_seed = []
        for seed in seeds:
            a = prompt_qualities(out / f"seed_{seed}" / method, k, prefix)
            b = prompt_qualities(out / f"seed_{seed}" / vanilla, k, prefix)
            if a and b:
                per_seed.append({i: a[i] - b[i] for i in a.keys() & b.keys()})
        if not per_seed:
            return rows
        ids = sorted(set.intersection(*(set(d) for d in per_seed)))
        diffs = np.array([[d[i] for d in per_seed] for i in ids])  # (prompts, seeds)
        rng = np.random.default_rng(0)
        means = diffs[rng.integers(0, len(ids), size=(n_boot, len(ids)))].mean(axis=(1, 2))
        lo, hi = np.percentile(means, [2.5, 97.5])
        rows.append({"set": prefix, "iteration": k, "seeds": len(per_seed), "prompts": len(ids),
                     "mean": float(diffs.mean()), "ci": [float(lo), float(hi)]})
        k += 1


def paired_table(rows: list[dict[str, Any]], method: str = METHOD, vanilla: str = VANILLA) -> list[str]:
    method, vanilla = arm_name(method), arm_name(vanilla)
    lines = [f"| set | iter | seeds x prompts | {method} - {vanilla} quality | 95% CI | reading |", "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci"]
        reading = f"{method} higher" if lo > 0 else f"{vanilla} higher" if hi < 0 else "not distinguishable"
        lines.append(f"| {SETS[r['set']]} | {r['iteration']} | {r['seeds']} x {r['prompts']} | {r['mean']:+.4f} | "
                     f"[{lo:+.4f}, {hi:+.4f}] | {reading} |")
    return lines


def write_study(out: Path, seeds: list[int], arms: list[str]) -> Path:
    """study.md, study.json and the band plots of the seeds' runs under `out`."""
    from ilrdpo.evaluation.plots import plot_bands

    rows = collect(out, seeds, arms)
    atomic_write_text(out / "study.json", json.dumps(rows, indent=1))
    sampled = ("sampled: the same over the sampled eval answers (experimental.eval_samples); "
               if "sampled" in _present_sets(rows) else "")
    legend = ("Mean over seeds, (min..max) in brackets. length: mean eval answer length in tokens; quality: the "
              f"judge's similarity to the reference; {sampled}LC win %: length-controlled win rate against the base "
              "model; alpha: the per-token alpha the kept training used; trainings: how many times alpha control "
              "trained the round (1 + attempts its retries replaced); saturated: share of training pairs whose "
              "length term |alpha * gap| exceeds 3 logits; reversed: share the loss learns shorter-first (IPO: "
              "length term above its target margin 1/2); held-out: the second held-out set (prompts_heldout.jsonl), "
              "never used to choose settings.")
    lines = [f"# Demo over seeds {', '.join(map(str, seeds))}", "", legend, "", *study_table(rows, arms), ""]
    if VANILLA in arms:
        lines += ["## The claim (issue 12)", ""]
        for method in (arm for arm in arms if arm != VANILLA):
            for prefix, name in _present_sets(rows).items():
                failures = check_claim(rows, prefix, method=method)
                lines.append(f"- {arm_name(method)}, {name}: " + ("met" if not failures else "not met: " + "; ".join(failures)))
        lines.append("")
        for method in (arm for arm in arms if arm != VANILLA):
            paired = [r for prefix in _present_sets(rows) for r in paired_differences(out, seeds, prefix, method)]
            if paired:
                lines += [f"### {arm_name(method)} against {arm_name(VANILLA)}, prompt by prompt", "",
                          ("The quality difference on each prompt (same prompt, same seed), averaged; the interval "
                           "resamples prompts. The claim above compares means; this says whether a gap is more than "
                           "the eval set's sampling noise."), "", *paired_table(paired, method), ""]
    for prefix, name in _present_sets(rows).items():
        panels = {title: {arm_name(arm): by_iteration(rows, arm, f"{prefix}_{key}") for arm in arms}
                  for key, title in (("length", "mean length (tokens)"), ("quality", "quality"))}
        if prefix == "heldout":
            panels["ROUGE-L"] = {arm_name(arm): by_iteration(rows, arm, "heldout_rougeL") for arm in arms}
        if plot_bands(panels, out / f"study_{prefix}.png", title=name):
            lines += [f"![{name}](study_{prefix}.png)", ""]
    atomic_write_text(out / "study.md", "\n".join(lines))
    return out / "study.md"

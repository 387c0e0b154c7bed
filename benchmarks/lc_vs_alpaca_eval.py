"""The project's joint LC win rate against alpaca-eval 0.6.6's own GLM, on generated annotation sets.

    .venv/bin/python benchmarks/lc_vs_alpaca_eval.py [--seeds 0 1 2] [--venv /tmp/aevenv] [--ablation] [--all-rows]

Creates the reference environment if it is missing (a separate venv with alpaca-eval==0.6.6 and
the scikit-learn / pandas of its release time, installed from the package index), generates
AlpacaEval-shaped annotation sets (805 prompts, a shared baseline, the baseline's concise and
verbose variants as length anchors, soft judge preferences; five sets of issue 10 and six with one
model at 3% to 400% of the baseline's length among ordinary ones), and prints per model and per
anchor (scored as alpaca-eval scores its gamed variants): the raw win rate, alpaca-eval's
`get_length_controlled_winrate` (glm "length_controlled_v1") and ours, then the mean and worst gap
per scenario; ours without anchors is compared with alpaca-eval's "length_controlled_noreg".
--ablation adds the LC change of each remaining difference (docs/lc.md).

alpaca-eval downloads df_gamed.csv (the gamed-baseline rows and the instruction difficulty)
from the Hugging Face hub inside `_get_featurized_data`. The driver below replaces the module's
`hf_hub_download` with a function returning a CSV written here from the generated anchors and a
difficulty we supply, so the run is offline and the reference sees exactly our inputs.
Two references are printed: "AE" uses the generating difficulty (what AlpacaEval's published
file is: a difficulty estimated once from many models) and "AE|our d" uses the difficulty our
stage 1 estimated for that model (so the gap to ours isolates the per-model fit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ilrdpo.evaluation.lc import instruction_difficulty, joint_lc, scaled_tanh

P = 805  # AlpacaEval's instruction count
REFERENCE_PACKAGES = ["alpaca-eval==0.6.6", "scikit-learn==1.5.2", "pandas==2.2.3", "numpy<2.1"]
ANCHORS = {"concise": -0.7, "verbose": 0.45}  # mean log length ratio of the gamed baseline variants
V1 = "np.tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline.astype(float) - 1"
# alpaca-eval's v1 fit moved one step at a time towards ours (--ablation): an L2 penalty instead of L1, then
# theta almost free as ours (the not_gamed_baseline column scaled by 100: its L2 penalty 10^4 times weaker)
ABLATIONS = {
    "l2": {"formula": V1, "regularize_to_baseline_lambda": 0.2, "kwargs": {"n_splits": 5, "penalty": "l2"}},
    "l2free": {"formula": V1.replace("not_gamed_baseline.astype(float)", "I(100 * not_gamed_baseline.astype(float))"),
               "regularize_to_baseline_lambda": 0.2, "kwargs": {"n_splits": 5, "penalty": "l2"}},
}

DRIVER = r'''
import json, sys, tempfile, warnings
import numpy as np, pandas as pd
import alpaca_eval.metrics.glm_winrate as glm
warnings.filterwarnings("ignore")
job = json.load(open(sys.argv[1]))
base = np.array(job["base_len"])
tmp = tempfile.mkdtemp()
out = {}
for task in job["tasks"]:
    rows = []
    for name, a in job["anchors"].items():  # gamed-baseline rows as alpaca-eval stores them
        delta = base - np.array(a["len"])
        rows.append(pd.DataFrame({"model": name, "index": np.arange(len(base)), "preference": a["prefs"],
                                  "std_delta_len": delta / delta.std(ddof=1),
                                  "instruction_difficulty": task["difficulty"], "not_gamed_baseline": False}))
    path = f"{tmp}/df_gamed.csv"
    pd.concat(rows).to_csv(path, index=False)
    glm.hf_hub_download = lambda **kwargs: path  # offline: df_gamed.csv is the file we just wrote
    ann = pd.DataFrame({"preference": 1.0 + np.array(task["prefs"]), "output_1": ["x" * int(n) for n in base],
                        "output_2": ["y" * int(n) for n in task["len"]], "index": np.arange(len(base)),
                        "generator_1": "baseline", "generator_2": task["model"], "annotator": "judge"})
    metrics = glm.get_length_controlled_winrate(ann, glm_name=task["glm"], save_weights_dir=None,
                                                is_warn_extreme_changes=False, glm_info=task.get("glm_info"))
    out[task["key"]] = float(metrics["length_controlled_winrate"])
json.dump(out, sys.stdout)
'''


def ensure_reference(venv: Path) -> Path:
    """Python of a venv with alpaca-eval 0.6.6, created and installed on first use."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import alpaca_eval.metrics.glm_winrate"]
    if python.exists() and subprocess.run(probe, check=False, capture_output=True).returncode == 0:
        return python
    print(f"installing alpaca-eval 0.6.6 into {venv} (once)...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *REFERENCE_PACKAGES], check=True)
    subprocess.run(probe, check=True)
    return python


def _series(rng, base, difficulty, quality, mean_log_ratio, sd_log_ratio, length_bias, judge="spread"):
    """Lengths (chars) and soft preferences of one generator against the baseline.

    logit = quality + difficulty_x + length_bias * L + N(0, 1) judge noise, the judge's probability
    of preferring the model being the sigmoid of it (a soft label, as the weighted_alpaca_eval_gpt4_turbo
    annotator gives). L = tanh(delta / std(delta)) for judge "spread" (the GLM's own feature) and
    tanh(log(len / len_baseline)) for judge "ratio" (a judge whose taste for length does not depend
    on the model's spread: the extreme-length scenarios, where the GLM is then only an approximation)."""
    lengths = np.maximum(1, np.round(base * np.exp(rng.normal(mean_log_ratio, sd_log_ratio, base.size))))
    delta = lengths - base
    feature = np.tanh(delta / delta.std(ddof=1)) if judge == "spread" else np.tanh(np.log(lengths / base))
    logit = quality + difficulty + length_bias * feature + rng.normal(0, 1, base.size)
    return 1.0 / (1.0 + np.exp(-logit)), lengths


EXTREME_RATIOS = (0.03, 0.10, 0.25, 0.50, 2.0, 4.0)  # issue 32: extreme model's mean length / baseline's
ORDINARY = 10  # ordinary models fitted jointly with each extreme one


def extreme_specs(rng) -> dict[str, tuple]:
    """One scenario per extreme length ratio: that model (quality drawn like the others) and
    ORDINARY leaderboard-like models, judged by a "ratio" judge (see _series)."""
    specs = {}
    for ratio in EXTREME_RATIOS:
        models = [(f"x{ratio:g}", rng.normal(-0.5, 1.0), float(np.log(ratio)), 0.5)]
        models += [(f"o{i}", rng.normal(-0.7, 1.0), rng.normal(0.0, 0.3), rng.uniform(0.3, 0.6)) for i in range(ORDINARY)]
        specs[f"{ratio:.0%} of baseline length, +{ORDINARY} ordinary"] = (1.5, models, "ratio")
    return specs


def scenarios(seed: int) -> dict[str, dict]:
    """The five annotation sets of issue 10 and the six extreme-length ones of issue 32, each with
    its own baseline, anchors and models."""
    rng = np.random.default_rng(seed)
    specs = {  # name: (length bias of the judge, [(model, quality, mean log ratio, sd log ratio)])
        "length-biased judge, no quality gap": (1.5, [("short", 0.0, -0.4, 0.5), ("same", 0.0, 0.0, 0.5),
                                                      ("long", 0.0, 0.4, 0.5)]),
        "length-blind judge, quality gap": (0.0, [("worse", -1.0, 0.2, 0.5), ("equal", 0.0, -0.2, 0.5),
                                                  ("better", 1.0, 0.0, 0.5)]),
        "longer on ~97% of prompts": (1.5, [("longer97", 0.5, 0.75, 0.4)]),
        "shorter on ~97% of prompts": (1.5, [("shorter97", 0.5, -0.75, 0.4)]),
        "leaderboard, 50 models jointly": (1.2, [(f"m{i:02d}", rng.normal(-0.7, 1.0), rng.normal(0.0, 0.45),
                                                  rng.uniform(0.3, 0.6)) for i in range(50)]),
    }
    sets = {name: _annotation_set(rng, bias, models, "spread") for name, (bias, models) in specs.items()}
    rng = np.random.default_rng([seed, 32])  # its own stream: the five sets above stay as they were
    sets.update({name: _annotation_set(rng, *spec) for name, spec in extreme_specs(rng).items()})
    return sets


def _annotation_set(rng, bias: float, models: list[tuple], judge: str) -> dict:
    """A baseline (~1500 characters), its difficulty, its two gamed variants and the models."""
    base = np.round(np.exp(rng.normal(7.3, 0.6, P)))
    difficulty = rng.normal(0.0, 1.0, P)
    anchors = {a: _series(rng, base, difficulty, 0.0, ratio, 0.3, bias, judge) for a, ratio in ANCHORS.items()}
    return {"base": base, "difficulty": difficulty, "anchors": anchors,
            "models": {m: _series(rng, base, difficulty, q, mu, sd, bias, judge) for m, q, mu, sd in models}}


def compare(seed: int, python: Path, n_boot: int = 200, ablation: bool = False) -> list[dict]:
    """One row per (scenario, model or anchor): raw, alpaca-eval's LC (glm length_controlled_v1,
    with the gamed rows) with the true and with our difficulty, ours; and alpaca-eval without the
    gamed rows (length_controlled_noreg) against ours without anchors. An anchor is scored as
    alpaca-eval scores its gamed variants: a model whose fit also holds every gamed row."""
    rows, jobs = [], []
    for name, s in scenarios(seed).items():
        models, anchors = s["models"], s["anchors"]
        prefs_of = {m: p for m, (p, _) in models.items()}
        lengths_of = {m: n for m, (_, n) in models.items()}
        ours = joint_lc(prefs_of, lengths_of, s["base"], anchors=anchors, n_boot=n_boot, seed=seed, score_anchors=True)
        bare = joint_lc(prefs_of, lengths_of, s["base"], n_boot=0, seed=seed)  # the same fit without length anchors
        series = {**models, **anchors}
        prefs = np.array([p for p, _ in series.values()])
        lengths = np.array([n for _, n in series.values()])
        our_d, _ = instruction_difficulty(prefs, scaled_tanh(lengths - s["base"])[0][0], list(range(len(series))), seed)
        tasks = []
        for i, (m, (p, n)) in enumerate(series.items()):
            runs = [("true", s["difficulty"], "length_controlled_v1"), ("ours", our_d[i], "length_controlled_v1")]
            if m in models:
                runs.append(("noreg", s["difficulty"], "length_controlled_noreg"))
            if ablation:
                runs += [(label, our_d[i], "length_controlled_v1") for label in ABLATIONS]
            for label, d, glm_name in runs:
                tasks.append({"key": f"{m}|{label}", "model": m, "prefs": p.tolist(), "len": n.tolist(),
                              "difficulty": d.tolist(), "glm": glm_name, "glm_info": ABLATIONS.get(label)})
            rows.append({"seed": seed, "scenario": name, "model": m, "anchor": m in anchors, "raw": 100 * p.mean(),
                         "longer": float(np.mean(n > s["base"])), "ours": ours[m].lc_win_rate, "ci": ours[m].lc_ci,
                         "no_anchors": bare[m].lc_win_rate if m in models else None})
        jobs.append({"base_len": s["base"].tolist(),
                     "anchors": {a: {"prefs": p.tolist(), "len": n.tolist()} for a, (p, n) in anchors.items()},
                     "tasks": tasks})
    reference = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, job in enumerate(jobs):
            path = Path(tmp) / f"job{i}.json"
            path.write_text(json.dumps(job))
            done = subprocess.run([str(python), "-c", DRIVER, str(path)], capture_output=True, text=True, check=True)
            reference[i] = json.loads(done.stdout)
    names = list(dict.fromkeys(r["scenario"] for r in rows))
    for row in rows:
        ref = reference[names.index(row["scenario"])]
        row["ae"], row["ae_our_d"] = ref[f"{row['model']}|true"], ref[f"{row['model']}|ours"]
        row["ae_noreg"] = ref.get(f"{row['model']}|noreg")
        row.update({f"ae_{label}": ref[f"{row['model']}|{label}"] for label in ABLATIONS if ablation})
    return rows


def ablation_table(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per scenario, the (mean, max) absolute LC change of each remaining difference, taken in turn
    from alpaca-eval's v1 fit to ours: its published difficulty -> ours; L1 -> L2; theta penalised ->
    almost free; the rest (CV folds by prompt, solver); and, for the models, no gamed rows at all
    (ours without anchors against ours)."""
    steps = {"difficulty": ("ae", "ae_our_d"), "L1 -> L2": ("ae_our_d", "ae_l2"),
             "theta free": ("ae_l2", "ae_l2free"), "rest": ("ae_l2free", "ours"), "no anchors": ("ours", "no_anchors")}
    out = {}
    for name in [*dict.fromkeys(r["scenario"] for r in rows), "all"]:
        sel = [r for r in rows if name in ("all", r["scenario"])]
        out[name] = {}
        for step, (a, b) in steps.items():
            change = np.array([abs(r[b] - r[a]) for r in sel if r[b] is not None])
            out[name][step] = (float(change.mean()), float(change.max()))
    return out


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per scenario and overall: mean and max |ours - AE| (models and anchors), the same with
    alpaca-eval given our difficulty, and |ours without anchors - AE without gamed rows| (models)."""
    out = {}
    for name in [*dict.fromkeys(r["scenario"] for r in rows), "all"]:
        sel = [r for r in rows if name in ("all", r["scenario"])]
        gap = np.array([abs(r["ours"] - r["ae"]) for r in sel])
        gap_d = np.array([abs(r["ours"] - r["ae_our_d"]) for r in sel])
        gap_bare = np.array([abs(r["no_anchors"] - r["ae_noreg"]) for r in sel if not r["anchor"]])
        out[name] = {"n": len(sel), "mean": float(gap.mean()), "max": float(gap.max()),
                     "mean_same_d": float(gap_d.mean()), "max_same_d": float(gap_d.max()),
                     "mean_bare": float(gap_bare.mean()), "max_bare": float(gap_bare.max())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/aevenv"))
    parser.add_argument("--all-rows", action="store_true", help="print every model, not only the first 8 and the extreme ones")
    parser.add_argument("--ablation", action="store_true", help="also print the LC change of each remaining difference")
    args = parser.parse_args()
    python = ensure_reference(args.venv)
    rows = [row for seed in args.seeds for row in compare(seed, python, ablation=args.ablation)]
    print(f"{'seed':>4} {'scenario':<38} {'model':<10} {'longer':>6} {'raw':>6} {'AE':>6} {'AE|our d':>8} "
          f"{'ours [95% CI]':>22} {'ours-AE':>7} {'AE noreg':>8} {'no anchors':>10}")
    for r in rows:
        if not args.all_rows and (r["model"][0] == "o" or r["model"][0] == "m" and int(r["model"][1:]) >= 8):
            continue
        ci = f"[{r['ci'][0]:.1f}, {r['ci'][1]:.1f}]"
        bare = "" if r["anchor"] else f"{r['ae_noreg']:>8.1f} {r['no_anchors']:>10.1f}"
        print(f"{r['seed']:>4} {r['scenario']:<38} {r['model']:<10} {r['longer']:>6.0%} {r['raw']:>6.1f} "
              f"{r['ae']:>6.1f} {r['ae_our_d']:>8.1f} {r['ours']:>7.1f} {ci:>14} {r['ours'] - r['ae']:>+7.2f} {bare}")
    print("\n|ours - AE| in points; models and anchors, over the seeds. Without anchors: ours without anchor rows"
          "\nagainst alpaca-eval's length_controlled_noreg (no gamed rows), models only.")
    print(f"{'scenario':<38} {'n':>4} {'mean':>6} {'worst':>6} {'mean|same d':>12} {'worst|same d':>12} "
          f"{'mean|no anchors':>15} {'worst|no anchors':>16}")
    for name, s in summarise(rows).items():
        print(f"{name:<38} {s['n']:>4} {s['mean']:>6.2f} {s['max']:>6.2f} {s['mean_same_d']:>12.2f} "
              f"{s['max_same_d']:>12.2f} {s['mean_bare']:>15.2f} {s['max_bare']:>16.2f}")
    if args.ablation:
        table = ablation_table(rows)
        steps = list(next(iter(table.values())))
        print("\nLC change of each difference, alpaca-eval's v1 fit moved to ours one step at a time: mean / max points")
        print(f"{'scenario':<38} " + " ".join(f"{step:>13}" for step in steps))
        for name, effects in table.items():
            print(f"{name:<38} " + " ".join(f"{m:>6.2f}/{x:<6.2f}" for m, x in effects.values()))


if __name__ == "__main__":
    main()

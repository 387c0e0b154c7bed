"""Iteration-time model: each stage's time as prompts, samples per prompt and answer length grow,
at two model sizes, measured on this machine, with a linear model per stage fitted on the smaller
runs and checked against the largest one.

    python benchmarks/iteration_time.py --out /tmp/iteration-time [--sizes 135m,60m] [--threads 1]

Every run is one real iteration of the demo's pipeline (`ilrdpo run`: sample, score with the
MiniLM judge, pair, train, evaluate) on the bundled SmolLM2-135M-Instruct ("135m") or the same
model cut to its first 10 of 30 layers ("60m": same vocabulary and width, a third of the layers).
Per stage the work is counted from the run's own files and the time regressed on it (least
squares, no intercept):

    generate   a x decode steps + b x answer tokens sampled   (steps: the longest answer of each
               generation batch of generation.batch_size rows, summed)
    score      a x answers + b x answer tokens
    train      b x tokens trained (metrics.jsonl "tokens": prompt + both answers per pair and epoch)
    eval       a x decode steps + b x answer tokens (greedy answers to 8 eval prompts)

The first runs of each size fit (a, b); the largest is predicted from them and printed next to
its measured time. A GPU run is predicted by the same formula with the per-step and per-token
costs of benchmarks/generation_throughput.py and train_throughput.py on that GPU (README,
"On a GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GRID = [(8, 2, 48), (12, 4, 48), (8, 4, 96), (16, 4, 96)]  # (prompts, samples, max_new_tokens); last: predicted
# what each stage's time is regressed on (no intercept): decode steps and tokens for the stages that
# generate (a step costs the same whatever the rows in it, on top of a cost per token), answers and
# their tokens for scoring, tokens for training
TERMS = {"generate": ("steps", "tokens"), "score": ("answers", "tokens"), "train": ("tokens",),
         "eval": ("steps", "tokens")}
STAGES = ("generate", "score", "train", "eval")


def cut_model(out: Path, layers: int) -> str:
    """The bundled SmolLM2-135M with only its first `layers` decoder layers, saved as a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ilrdpo.config import ModelSettings
    from ilrdpo.models import resolve_model_path

    folder = out / f"smollm2-{layers}layers"
    if not (folder / "config.json").exists():
        source = resolve_model_path(ModelSettings())
        model = AutoModelForCausalLM.from_pretrained(source)
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def run_one(out: Path, model: str, prompts: int, samples: int, max_new: int, threads: int | None) -> dict:
    """One iteration through the CLI; returns the stage times and the work each did."""
    from ilrdpo.demo import bundled_prompts

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", prompts), ("eval", 8)):
        lines = Path(bundled_prompts(split)).read_text().splitlines()[:n]
        (data / f"{split}{n}.jsonl").write_text("\n".join(lines) + "\n")
    run_dir = out / f"run-{Path(model).name}-{prompts}x{samples}x{max_new}"
    import yaml

    from ilrdpo.demo import demo_settings

    config = demo_settings(quick=False)["config"]
    config_file = out / "demo.yaml"
    config_file.write_text(yaml.safe_dump(config))
    args = [sys.executable, "-m", "ilrdpo", "run", str(config_file), f"output_dir={run_dir}",
            f"model.name_or_path={model}", f"data.prompts={data / f'train{prompts}.jsonl'}",
            f"data.eval_prompts={data / 'eval8.jsonl'}", f"generation.num_samples={samples}",
            f"generation.max_new_tokens={max_new}",
            "pairing.skip_truncated=false", "iterations.count=1", "eval.length_anchors=false"]
    env = {**os.environ, "ILRDPO_QUIET": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    if not (run_dir / "timings.json").exists():  # a finished run is measured again, not rerun
        proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"run failed ({run_dir}): {proc.stderr.strip().splitlines()[-1:]}")
    timings = json.loads((run_dir / "timings.json").read_text())
    iteration = run_dir / "iter_1"
    candidates = [json.loads(line) for line in (iteration / "candidates.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (iteration / "metrics.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (iteration / "eval_answers.jsonl").read_text().splitlines()]
    rows = [n for c in candidates for n in c["n_tokens"]]
    batch = 64  # the demo's generation.batch_size
    return {
        "prompts": prompts, "samples": samples, "max_new_tokens": max_new, "wall_s": time.perf_counter() - start,
        "time": {s: timings.get(f"iter 1 {s}", 0.0) for s in STAGES},
        "work": {
            "generate": {"steps": sum(max(rows[k:k + batch]) for k in range(0, len(rows), batch)),
                         "tokens": sum(rows)},
            "score": {"answers": len(rows), "tokens": sum(rows)},
            "train": {"tokens": metrics[-1]["tokens"]},
            "eval": {"steps": max(a["n_tokens"] for a in answers), "tokens": sum(a["n_tokens"] for a in answers)},
        },
    }


def fit(runs: list[dict], stage: str) -> list[float]:
    """Seconds per unit of each of the stage's TERMS, least squares over `runs`."""
    import torch

    x = torch.tensor([[float(r["work"][stage][term]) for term in TERMS[stage]] for r in runs], dtype=torch.float64)
    y = torch.tensor([[r["time"][stage]] for r in runs], dtype=torch.float64)
    return torch.linalg.lstsq(x, y).solution.flatten().tolist()


def predict(costs: list[float], run: dict, stage: str) -> float:
    return sum(c * run["work"][stage][term] for c, term in zip(costs, TERMS[stage]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="135m,60m")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report-only", action="store_true", help="print the model from OUT/results.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {"135m": "bundled:smollm2-135m-instruct", "60m": None}
    results: dict[str, list[dict]] = {}
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
    for size in [] if args.report_only else [s.strip() for s in args.sizes.split(",") if s.strip()]:
        model = models[size] or cut_model(out, 10)
        results[size] = [run_one(out, model, *point, args.threads) for point in GRID]
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"iteration_time: grid (prompts x samples x max_new_tokens) {GRID}, eval 8 prompts, "
          f"threads={args.threads or 'default'} cpus={os.cpu_count()}")
    for size, runs in results.items():
        print(f"\n{size}: per stage the work and seconds of each run; costs fitted on all runs but the last; "
              "the last predicted")
        total_predicted = total = 0.0
        for stage in STAGES:
            cells = " | ".join(", ".join(f"{v:,} {k}" for k, v in r["work"][stage].items()) + f" -> {r['time'][stage]:.1f} s"
                               for r in runs)
            costs = fit(runs[:-1], stage)
            model_text = " + ".join(f"{1000 * c:.2f} ms x {term}" for c, term in zip(costs, TERMS[stage]))
            predicted, measured = predict(costs, runs[-1], stage), runs[-1]["time"][stage]
            total_predicted, total = total_predicted + predicted, total + measured
            print(f"  {stage:8s} {cells}\n           time = {model_text}: predicted {predicted:.1f} s, measured "
                  f"{measured:.1f} s ({predicted / max(measured, 1e-9):.2f}x)")
        print(f"  iteration (these stages) predicted {total_predicted:.1f} s, measured {total:.1f} s "
              f"({total_predicted / max(total, 1e-9):.2f}x)")


if __name__ == "__main__":
    main()

"""Iteration-time model: each stage's time as prompts, samples per prompt and answer length grow,
at two model sizes, measured on this machine, with a linear model per stage fitted on the smaller
runs and checked against the largest one.

    python benchmarks/iteration_time.py --out /tmp/iteration-time [--sizes 135m,60m] [--threads 1]

Every run is one real iteration of the demo's pipeline (`ilrdpo run`: sample, score with the
MiniLM judge, pair, train, evaluate) on the bundled SmolLM2-135M-Instruct ("135m") or the same
model cut to its first 10 of 30 layers ("60m": same vocabulary and width, a third of the layers).
Per stage the work is counted from the run's own files, then time = overhead + work / rate:

    generate   answer tokens sampled (candidates.jsonl n_tokens)      + rows (prefill) as a second term
    score      answers scored (rows)
    pair       (negligible)
    train      tokens trained (metrics.jsonl "tokens": prompt + both answers per pair and epoch)
    eval       answer tokens of the eval answers (greedy)

The runs of each size but the largest fit (overhead, rate) by least squares; the largest is
predicted from them and printed next to its measured time. A GPU run is predicted by the same
formula with the rates of benchmarks/generation_throughput.py and train_throughput.py on that
GPU (README, "On a GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GRID = [(8, 2, 48), (12, 4, 48), (16, 4, 96)]  # (prompts, samples per prompt, max_new_tokens); last: predicted
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
            f"generation.max_new_tokens={max_new}", f"scoring.length_bias_cap={max_new}",
            "pairing.skip_truncated=false", "iterations.count=1", "eval.length_anchors=false"]
    env = {**os.environ, "ILRDPO_QUIET": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"run failed ({run_dir}): {proc.stderr.strip().splitlines()[-1:]}")
    timings = json.loads((run_dir / "timings.json").read_text())
    iteration = run_dir / "iter_1"
    candidates = [json.loads(line) for line in (iteration / "candidates.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (iteration / "metrics.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (iteration / "eval_answers.jsonl").read_text().splitlines()]
    return {
        "prompts": prompts, "samples": samples, "max_new_tokens": max_new, "wall_s": time.perf_counter() - start,
        "time": {s: timings.get(f"iter 1 {s}", 0.0) for s in STAGES},
        "work": {"generate": sum(sum(c["n_tokens"]) for c in candidates),
                 "score": sum(len(c["responses"]) for c in candidates),
                 "train": metrics[-1]["tokens"],
                 "evaluate": sum(a.get("n_tokens", 0) for a in answers)},
    }


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares time = overhead + work / rate over (work, time) points: (overhead, rate)."""
    n = len(points)
    mean_w = sum(w for w, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    var = sum((w - mean_w) ** 2 for w, _ in points)
    slope = sum((w - mean_w) * (t - mean_t) for w, t in points) / var if var else mean_t / max(mean_w, 1)
    overhead = max(mean_t - slope * mean_w, 0.0)
    return overhead, (1 / slope if slope > 0 else float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="135m,60m")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {"135m": "bundled:smollm2-135m-instruct", "60m": None}
    results: dict[str, list[dict]] = {}
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        model = models[size] or cut_model(out, 10)
        results[size] = [run_one(out, model, *point, args.threads) for point in GRID]
        (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"iteration_time: grid (prompts x samples x max_new_tokens) {GRID}, eval 8 prompts, "
          f"threads={args.threads or 'default'} cpus={os.cpu_count()}")
    for size, runs in results.items():
        print(f"\n{size}: stage, per run 'work -> seconds', fitted overhead + work / rate, largest run predicted")
        for stage in STAGES:
            cells = " | ".join(f"{r['work'][stage]:,} -> {r['time'][stage]:.1f} s" for r in runs)
            overhead, rate = fit([(r["work"][stage], r["time"][stage]) for r in runs[:-1]])
            last = runs[-1]
            predicted = overhead + last["work"][stage] / rate
            print(f"  {stage:9s} {cells} | {overhead:.1f} s + work / {rate:,.1f} per s | "
                  f"predicted {predicted:.1f} s, measured {last['time'][stage]:.1f} s "
                  f"({predicted / max(last['time'][stage], 1e-9):.2f}x)")
        total_pred = sum(fit([(r["work"][s], r["time"][s]) for r in runs[:-1]])[0]
                         + runs[-1]["work"][s] / fit([(r["work"][s], r["time"][s]) for r in runs[:-1]])[1]
                         for s in STAGES)
        total = sum(runs[-1]["time"][s] for s in STAGES)
        print(f"  iteration (these stages) predicted {total_pred:.1f} s, measured {total:.1f} s "
              f"({total_pred / max(total, 1e-9):.2f}x)")


if __name__ == "__main__":
    main()

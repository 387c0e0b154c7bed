"""The demo's second held-out set: every iterate of a finished run answers prompts of another kind.

The loop evaluates on one eval set (data.eval_prompts), which the demo's settings were chosen
on. This set (prompts_heldout.jsonl: summarise-this-sentence, antonym and plural questions,
each with a reference) was never used to choose anything; each model answers it the way the
loop's eval answers (same system prompt, decoding and seed), the run's own judge scores the
answers, and ROUGE-L and chrF against the references give a quality measure the judge's
similarity score does not share.

Written per run (RunDir.heldout): a summary per iteration (summarize(): quality, reward,
length, text metrics) and the answers. Iteration 0 (the initial model) is answered once and
copied to the runs that share it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ilrdpo.config import Config
from ilrdpo.demo.judge import demo_judge
from ilrdpo.eval_stage import answer_prompts, judge_answers
from ilrdpo.evaluation.compare import summarize
from ilrdpo.files import atomic_write_text, write_jsonl
from ilrdpo.records import read_prompts
from ilrdpo.rundir import RunDir


def _model(rundir: RunDir, config: Config, k: int):
    from ilrdpo.models import load_policy, load_saved_policy

    if k == 0:
        model, tokenizer, _ = load_policy(config.model, trainable=False)
    else:
        model, tokenizer, _ = load_saved_policy(rundir.file(k, "model"), config.model, trainable=False)
    return model, tokenizer


def evaluate_heldout(run_dirs: list[Path], prompts_path: str, *, base: Path | None = None,
                     scorer=None, iterations: list[int] | None = None) -> dict[str, dict[int, dict]]:
    """Answer `prompts_path` with iterations 0..N of each run (or only `iterations`); {run: {k: summary}}.

    Runs share iteration 0 when their configs agree on model, data and eval settings (the demo's
    arms do), so the initial model answers once; `base` (a run directory where an earlier call on the
    same prompts, greedy, answered iteration 0) skips even that. Existing results are kept (resumable).
    """
    prompts = read_prompts(prompts_path)
    results: dict[str, dict[int, dict]] = {}
    first_base = RunDir(base) if base is not None and RunDir(base).heldout(0).exists() else None
    for run_dir in map(Path, run_dirs):
        rundir = RunDir(run_dir)
        config = rundir.recorded_config()
        judge_settings = config.judge_scorer()
        scorer = scorer or demo_judge(config)
        gen = config.generation
        done = [k for k in sorted(rundir.iterations()) if k == 0 or rundir.file(k, "model").exists()]
        results[str(run_dir)] = {}
        for k in [k for k in done if iterations is None or k in iterations]:
            out, answers = rundir.heldout(k), rundir.heldout(k, answers=True)
            if not out.exists() and k == 0 and first_base is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(first_base.heldout(0, answers=True), answers)
                shutil.copy2(first_base.heldout(0), out)
            if not out.exists():
                model, tokenizer = _model(rundir, config, k)
                rows = answer_prompts(model, tokenizer, prompts, gen, config.data, greedy=True,
                                      seed=config.seed, description=f"{run_dir.name} iter {k} held-out")
                del model
                rows = judge_answers(scorer, prompts, rows, judge_settings)
                out.parent.mkdir(parents=True, exist_ok=True)
                write_jsonl(answers, rows)
                summary: dict[str, Any] = {"iteration": k, "prompts": prompts_path, **summarize(rows, prompts)}
                atomic_write_text(out, json.dumps(summary, indent=1))
            if k == 0 and first_base is None:
                first_base = rundir
            results[str(run_dir)][k] = json.loads(out.read_text())
    return results


def heldout_section(run_dirs: list[Path], names: list[str]) -> list[str]:
    """Markdown for report.md: each run's iterations on the second held-out set."""
    lines = ["## Second held-out set (prompts_heldout.jsonl, never used to choose settings)", "",
             ("Answers decoded as in the eval above; quality is the judge's similarity to the reference, "
              "ROUGE-L (F1) and chrF compare with the reference independently of the judge."), "",
             "| run | iteration | mean length (tokens) | quality | ROUGE-L | chrF |", "|---|---|---|---|---|---|"]
    for run_dir, name in zip(map(Path, run_dirs), names):
        for path in RunDir(run_dir).heldout_iterations().values():
            s = json.loads(path.read_text())
            text = s.get("text") or {}
            lines.append(f"| {name} | {s['iteration']} | {s['length']['tokens_mean']:.1f} | {s['quality_mean']:.4f} | "
                         f"{text.get('rougeL') or 0:.1f} | {text.get('chrf') or 0:.1f} |")
    return [*lines, ""]

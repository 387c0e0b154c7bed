"""`ilrdpo evaluate`: answer a prompts file with a model (and a baseline), judge both, compare.

Answering and judging are the evaluate stage's own functions (ilrdpo.eval_stage), so the command
and the loop's evaluation report the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.table import Table

from ilrdpo import ranks
from ilrdpo.config import (
    DataSettings,
    GenerationSettings,
    ModelSettings,
    ScoringSettings,
    explain_validation_error,
)
from ilrdpo.errors import UserInputError
from ilrdpo.eval_stage import answer_anchors, answer_prompts, judge_answers
from ilrdpo.evaluation.compare import compare_all, summarize
from ilrdpo.files import write_jsonl
from ilrdpo.progress import console
from ilrdpo.records import read_prompts
from ilrdpo.removed_keys import refuse_removed_keys


def load_judge_settings(path: str | None) -> ScoringSettings:
    """judge.yaml holds the keys of the config's scoring section (defaults when path is None)."""
    if path is None:
        return ScoringSettings()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        section = data.get("scoring", data)
        if isinstance(section, dict):
            refuse_removed_keys({"scoring": section}, str(path))
        return ScoringSettings.model_validate(section)
    except FileNotFoundError:
        raise UserInputError(f"{path}: judge file not found") from None
    except yaml.YAMLError:
        raise UserInputError(f"{path}: invalid YAML") from None
    except ValidationError as error:
        raise UserInputError(explain_validation_error(error, str(path))) from None


def evaluate_models(model: str, prompts_path: str, judge: ScoringSettings, *, baseline: str | None = None,
                    generation: GenerationSettings | None = None, data: DataSettings | None = None,
                    greedy: bool = True, seed: int = 0, out_dir: Path | None = None,
                    anchors: bool = False) -> dict[str, Any]:
    """`ilrdpo evaluate`: answer the prompts with `model` (and `baseline`), judge both, compare.

    Models are hub ids, folders (full weights or LoRA adapters) or bundled names. Models are
    loaded one at a time. With out_dir, the answers are written there as JSONL. With anchors
    (and a baseline), the baseline also answers concisely and verbosely (two more passes) and
    those answers pin the LC length slope.
    """
    from ilrdpo.models import load_saved_policy  # torch and transformers: not for `--help`
    from ilrdpo.scoring import build_scorer, judge_record

    generation = generation or GenerationSettings()
    data = data or DataSettings()
    prompts = read_prompts(prompts_path)
    scorer = build_scorer(judge)
    answers = {}
    for name, spec in (("model", model), ("baseline", baseline)):
        if spec is None:
            continue
        policy, tokenizer, _ = load_saved_policy(spec, ModelSettings(name_or_path=spec), trainable=False)
        rows = answer_prompts(policy, tokenizer, prompts, generation, data, greedy=greedy, seed=seed,
                              description=f"{name} answers")
        answers[name] = judge_answers(scorer, prompts, rows, judge)
        if name == "baseline" and anchors:
            styled = answer_anchors(policy, tokenizer, prompts, generation, data, greedy=greedy, seed=seed)
            for style, styled_rows in styled.items():
                answers[f"anchor_{style}"] = judge_answers(scorer, prompts, styled_rows, judge)
                if out_dir is not None and ranks.is_main():
                    write_jsonl(Path(out_dir) / f"baseline_{style}_answers.jsonl", styled_rows)
        del policy
        if out_dir is not None and ranks.is_main():
            write_jsonl(Path(out_dir) / f"{name}_answers.jsonl", rows)
    result = {"model": model, "baseline": baseline, "prompts": prompts_path, "judge": judge_record(judge),
              "greedy": greedy, "seed": seed,
              "model_summary": summarize(answers["model"], prompts)}
    if baseline is not None:
        result["baseline_summary"] = summarize(answers["baseline"], prompts)
        anchor_rows = {name.removeprefix("anchor_"): rows for name, rows in answers.items()
                       if name.startswith("anchor_")}
        fits = compare_all({"model": answers["model"]}, answers["baseline"], anchors=anchor_rows,
                           tie_tolerance=judge.tie_tolerance)["model"]
        result["vs_baseline"], result["vs_baseline_quality"] = fits["reward"], fits["quality"]
    return result


def print_evaluation(result: dict[str, Any]) -> None:
    """The result of evaluate_models as a rich table on the console (stderr)."""
    table = Table("", "reward", "quality", "mean tokens", "truncated", title=f"prompts: {result['prompts']}")
    for name in ("model", "baseline"):
        s = result.get(f"{name}_summary")
        if s:
            table.add_row(f"{name}: {result[name]}", f"{s['reward_mean']:.4f}", f"{s['quality_mean']:.4f}",
                          f"{s['length']['tokens_mean']:.1f}", f"{s['length']['truncated_share']:.0%}")
    console.print(table)
    for key, label in (("vs_baseline", "judge reward"), ("vs_baseline_quality", "quality only")):
        w = result.get(key)
        if w:
            lo, hi = w["win_rate_ci"]
            lc_ci = f" [{w['lc_ci'][0]:.1f}, {w['lc_ci'][1]:.1f}]" if w.get("lc_ci") else ""
            console.print(f"win rate ({label}): {w['win_rate']:.1f}% [{lo:.1f}, {hi:.1f}]  "
                          f"LC win rate: {w['lc_win_rate']:.1f}%{lc_ci}"
                          + (f"  ({w['lc_note']})" if w["lc_note"] else ""))

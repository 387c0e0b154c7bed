"""Answer a prompt set with a model, judge the answers, compare against a baseline's answers.

Used by `ilrdpo evaluate` and by the loop's per-iteration evaluation, so both report the same
numbers. An answer record: id, response, n_tokens, n_chars, truncated, quality (the judge's
own score) and reward (quality plus the configured length bias, what training optimises).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ilrdpo.config import DataSettings, GenerationSettings, ScoringSettings
from ilrdpo.evaluation.lengths import length_stats
from ilrdpo.evaluation.text_metrics import text_metrics
from ilrdpo.evaluation.winrate import pairwise_preferences, win_rates
from ilrdpo.generation import generate_answers
from ilrdpo.records import Prompt, read_jsonl_tolerant, write_jsonl
from ilrdpo.scoring import Scorer, score_in_batches, shaped_rewards


def answer_prompts(model, tokenizer, prompts: list[Prompt], generation: GenerationSettings, data: DataSettings,
                   *, greedy: bool, seed: int, description: str = "eval answers") -> list[dict[str, Any]]:
    samples = generate_answers(model, tokenizer, prompts, generation, data, num_samples=1, seed=seed,
                               greedy=greedy, description=description)
    return [{"id": p.id, "response": samples[p.id][0].text, "n_tokens": samples[p.id][0].n_tokens,
             "n_chars": len(samples[p.id][0].text), "truncated": samples[p.id][0].truncated} for p in prompts]


def judge_answers(judge: Scorer, prompts: list[Prompt], rows: list[dict[str, Any]],
                  settings: ScoringSettings) -> list[dict[str, Any]]:
    """Adds quality and reward to each answer record (in place) and returns the rows."""
    quality = score_in_batches(judge, prompts, [r["response"] for r in rows], settings.batch_size)
    rewards = shaped_rewards(quality, [r["n_tokens"] for r in rows], settings)
    for row, q, r in zip(rows, quality, rewards):
        row["quality"], row["reward"] = q, r
    return rows


def compare(rows: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str = "reward",
            tie_tolerance: float = 0.0) -> dict[str, Any]:
    """Win rate and LC win rate of `rows` against `baseline` (same prompts, same order) on `key`."""
    by_id = {r["id"]: r for r in baseline}
    paired = [(r, by_id[r["id"]]) for r in rows if r["id"] in by_id]
    prefs = pairwise_preferences([a[key] for a, _ in paired], [b[key] for _, b in paired], tie_tolerance)
    return win_rates(prefs, [a["n_tokens"] for a, _ in paired], [b["n_tokens"] for _, b in paired])


def summarize(rows: list[dict[str, Any]], prompts: list[Prompt]) -> dict[str, Any]:
    """Mean reward and quality, length statistics and (with references) text metrics."""
    n = len(rows)
    summary: dict[str, Any] = {
        "n_prompts": n,
        "reward_mean": sum(r["reward"] for r in rows) / n,
        "quality_mean": sum(r["quality"] for r in rows) / n,
        "length": length_stats([r["n_tokens"] for r in rows], [r["n_chars"] for r in rows],
                               [r["truncated"] for r in rows], [p.target_length for p in prompts]
                               if any(p.target_length is not None for p in prompts) else None),
    }
    references = [p.reference for p in prompts]
    summary["text"] = text_metrics([r["response"] for r in rows],
                                   references if all(references) else None)
    return summary


def evaluate_answers(rows: list[dict[str, Any]], prompts: list[Prompt],
                     baselines: dict[str, list[dict[str, Any]]], tie_tolerance: float = 0.0) -> dict[str, Any]:
    """summarize() plus, per named baseline, win rates on the biased reward and on quality."""
    result = summarize(rows, prompts)
    for name, baseline in baselines.items():
        result[f"vs_{name}"] = compare(rows, baseline, "reward", tie_tolerance)
        result[f"vs_{name}_quality"] = compare(rows, baseline, "quality", tie_tolerance)
    return result


def cached_answers(path: Path, make) -> list[dict[str, Any]]:
    """Answer records from `path` if complete, else make() them and write them atomically."""
    rows = read_jsonl_tolerant(path)
    if rows:
        return rows
    rows = make()
    write_jsonl(path, rows)
    return rows


def load_judge_settings(path: str | None) -> ScoringSettings:
    """judge.yaml holds the keys of the config's scoring section (defaults when path is None)."""
    import yaml
    from pydantic import ValidationError

    from ilrdpo.config import explain_validation_error
    from ilrdpo.errors import UserInputError

    if path is None:
        return ScoringSettings()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return ScoringSettings.model_validate(data.get("scoring", data))
    except FileNotFoundError:
        raise UserInputError(f"{path}: judge file not found") from None
    except yaml.YAMLError:
        raise UserInputError(f"{path}: invalid YAML") from None
    except ValidationError as error:
        raise UserInputError(explain_validation_error(error, str(path))) from None


def evaluate_models(model: str, prompts_path: str, judge: ScoringSettings, *, baseline: str | None = None,
                    generation: GenerationSettings | None = None, data: DataSettings | None = None,
                    greedy: bool = True, seed: int = 0, out_dir: Path | None = None) -> dict[str, Any]:
    """`ilrdpo evaluate`: answer the prompts with `model` (and `baseline`), judge both, compare.

    Models are hub ids, folders (full weights or LoRA adapters) or bundled names. Models are
    loaded one at a time. With out_dir, the answers are written there as JSONL.
    """
    from ilrdpo.config import ModelSettings
    from ilrdpo.models import load_saved_policy
    from ilrdpo.records import read_prompts
    from ilrdpo.scoring import build_scorer

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
        del policy
        if out_dir is not None:
            write_jsonl(Path(out_dir) / f"{name}_answers.jsonl", rows)
    result = {"model": model, "baseline": baseline, "prompts": prompts_path, "judge": judge.model_dump(),
              "greedy": greedy, "seed": seed,
              "model_summary": summarize(answers["model"], prompts)}
    if baseline is not None:
        result["baseline_summary"] = summarize(answers["baseline"], prompts)
        result["vs_baseline"] = compare(answers["model"], answers["baseline"], "reward", judge.tie_tolerance)
        result["vs_baseline_quality"] = compare(answers["model"], answers["baseline"], "quality",
                                                judge.tie_tolerance)
    return result


def print_evaluation(result: dict[str, Any]) -> None:
    """The result of evaluate_models as a rich table on the console (stderr)."""
    from rich.table import Table

    from ilrdpo.progress import console

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
            console.print(f"win rate ({label}): {w['win_rate']:.1f}% [{lo:.1f}, {hi:.1f}]  "
                          f"LC win rate: {w['lc_win_rate']:.1f}%" + (f"  ({w['lc_note']})" if w["lc_note"] else ""))

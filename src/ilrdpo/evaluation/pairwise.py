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

"""`ilrdpo generate`: N answers per prompt from a trained model, optionally reranked (best-of-N).

With a scorer, every candidate carries the scorer's own score; with best-of the kept answer
maximises

    adjusted = score - length_weight * | |y| - L |      (the score alone without a target L)

where |y| is in tokens (data.count_tokens, as everywhere in the project) or characters, and L
is the prompt's own target_length when it has one, else --target-length. Summaries near a
length and dialogue replies picked from several samples are the two uses it was made for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilrdpo.config import DataSettings, GenerationSettings, ModelSettings, ScoringSettings
from ilrdpo.data import answer_length
from ilrdpo.errors import UserInputError
from ilrdpo.files import write_jsonl
from ilrdpo.generation import generate_answers
from ilrdpo.progress import console
from ilrdpo.records import Prompt, read_prompts


@dataclass
class Rerank:
    target_length: float | None = None
    length_unit: str = "tokens"
    length_weight: float = 0.0


def adjusted_score(score: float, length: int, target: float | None, weight: float) -> float:
    return score if target is None else score - weight * abs(length - target)


def choose(candidates: list[dict[str, Any]], target: float | None, rerank: Rerank) -> int:
    """Index of the candidate with the highest adjusted score (the first on ties)."""
    keys = [adjusted_score(c["score"], answer_length(c["n_tokens"], c["text"], rerank.length_unit), target,
                           rerank.length_weight) for c in candidates]
    return max(range(len(keys)), key=lambda i: (keys[i], -i))


def generate_file(model: str, prompts_path: str, out: str | Path, *, num_samples: int = 4,
                  scorer: ScoringSettings | None = None, best_of: bool = False, rerank: Rerank | None = None,
                  generation: GenerationSettings | None = None, data: DataSettings | None = None,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Answer every prompt of prompts_path with `model` (a folder `ilrdpo run`/`train` wrote, full
    or LoRA, or a hub id); write OUT.jsonl with prompt, response and candidates; return the rows."""
    from ilrdpo.models import load_saved_policy
    from ilrdpo.scoring import build_scorer, score_in_batches

    if best_of and scorer is None:
        raise UserInputError("option '--best-of': needs --scorer (the kept answer is the best-scored one)")
    rerank = rerank or Rerank()
    prompts = read_prompts(prompts_path)
    judge = build_scorer(scorer) if scorer is not None else None
    policy, tokenizer, _ = load_saved_policy(model, ModelSettings(name_or_path=model), trainable=False)
    samples = generate_answers(policy, tokenizer, prompts, generation or GenerationSettings(), data or DataSettings(),
                               num_samples=num_samples, seed=seed, source=prompts_path,
                               description=f"generating {num_samples} per prompt")
    del policy
    rows = [_row(p, samples[p.id]) for p in prompts]
    if judge is not None:
        flat = [(p, c) for p, row in zip(prompts, rows) for c in row["candidates"]]
        scores = score_in_batches(judge, [p for p, _ in flat], [c["text"] for _, c in flat], scorer.batch_size)
        for (_, candidate), score in zip(flat, scores):
            candidate["score"] = score
    for p, row in zip(prompts, rows):
        target = p.target_length if p.target_length is not None else rerank.target_length
        kept = choose(row["candidates"], target, rerank) if best_of else 0
        row["response"], row["kept"] = row["candidates"][kept]["text"], kept
    write_jsonl(out, rows)
    console.print(f"wrote {out} ({len(rows)} prompts x {num_samples} samples"
                  + (", best-of reranked" if best_of else "") + ")")
    print_summary(prompts, rows, rerank)
    return rows


def print_summary(prompts: list[Prompt], rows: list[dict[str, Any]], rerank: Rerank) -> None:
    """Mean length of the kept answers and, where every prompt has a reference, ROUGE and chrF."""
    from ilrdpo.evaluation.text_metrics import text_metrics

    kept = [row["candidates"][row["kept"]] for row in rows]
    lengths = [answer_length(c["n_tokens"], c["text"], rerank.length_unit) for c in kept]
    line = f"kept answers: mean length {sum(lengths) / len(lengths):.1f} {rerank.length_unit}"
    references = [p.reference for p in prompts]
    if all(references):
        metrics = text_metrics([c["text"] for c in kept], references)
        line += f", ROUGE-L {metrics['rougeL']:.3f}, chrF {metrics['chrf']:.1f} against the references"
    console.print(line)


def _row(prompt: Prompt, samples) -> dict[str, Any]:
    return {"id": prompt.id, "prompt": prompt.prompt,
            "candidates": [{"text": s.text, "score": None, "n_tokens": s.n_tokens, "n_chars": len(s.text),
                            "truncated": s.truncated} for s in samples]}

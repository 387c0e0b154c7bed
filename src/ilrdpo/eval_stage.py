"""The evaluate stage of each iteration: answer the eval prompts with a model, judge the answers,
compare them with the initial and the previous model, write iter_t/eval.json.

The `ilrdpo evaluate` command (ilrdpo.evaluate) answers and judges with the same functions, so both
report the same numbers; the comparisons themselves are pure metrics (ilrdpo.evaluation.compare).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ilrdpo import ranks
from ilrdpo.batching import autocast
from ilrdpo.config import Config, DataSettings, GenerationSettings, ScoringSettings
from ilrdpo.data import encode_prompt
from ilrdpo.decisions import judge_tie_tolerance, stage_seed
from ilrdpo.evaluation.compare import compare_all, evaluate_answers, per_prompt_means, summarize
from ilrdpo.files import atomic_write_text, read_finished_jsonl, write_jsonl
from ilrdpo.generation import generate_answers
from ilrdpo.progress import console
from ilrdpo.records import Prompt
from ilrdpo.rundir import ANCHOR_FILES, SAMPLES_FILE, RunDir
from ilrdpo.scoring import Scorer, score_in_batches, shaped_rewards


def answer_prompts(model, tokenizer, prompts: list[Prompt], generation: GenerationSettings, data: DataSettings,
                   *, greedy: bool, seed: int, description: str = "eval answers") -> list[dict[str, Any]]:
    samples = generate_answers(model, tokenizer, prompts, generation, data, num_samples=1, seed=seed,
                               greedy=greedy, description=description)
    return [_answer_record(p.id, samples[p.id][0]) for p in prompts]


def sample_prompts(model, tokenizer, prompts: list[Prompt], generation: GenerationSettings, data: DataSettings,
                   *, samples: int, seed: int, description: str = "sampled eval answers") -> list[dict[str, Any]]:
    """`samples` sampled answers per prompt: answer records with their draw's index in "sample",
    in prompt order (sample_inputs(prompts, samples) lines up with them)."""
    drawn = generate_answers(model, tokenizer, prompts, generation, data, num_samples=samples, seed=seed,
                             greedy=False, description=description)
    return [{**_answer_record(p.id, s), "sample": j} for p in prompts for j, s in enumerate(drawn[p.id])]


def sample_inputs(prompts: list[Prompt], samples: int) -> list[Prompt]:
    """Each prompt `samples` times, in the order of sample_prompts' records."""
    return [p for p in prompts for _ in range(samples)]


def _answer_record(prompt_id: str, sample) -> dict[str, Any]:
    return {"id": prompt_id, "response": sample.text, "n_tokens": sample.n_tokens, "n_chars": len(sample.text),
            "truncated": sample.truncated}


def judge_answers(judge: Scorer, prompts: list[Prompt], rows: list[dict[str, Any]],
                  settings: ScoringSettings) -> list[dict[str, Any]]:
    """Adds quality (the judge's value) and reward (with the judge's length bonus, if it has one:
    scoring.shaped_rewards) to each answer record (in place) and returns the rows."""
    quality = score_in_batches(judge, prompts, [r["response"] for r in rows], settings.batch_size)
    rewards = shaped_rewards(quality, [r["n_tokens"] for r in rows], judge)
    for row, q, r in zip(rows, quality, rewards):
        row["quality"], row["reward"] = q, r
    return rows


# Length anchors (issue 10): the base model answers the eval prompts under these system prompts
# at iteration 0; judged against its plain answers, they pin the LC length slope.
ANCHOR_INSTRUCTIONS = {
    "concise": "Answer as briefly as possible: give only what the question asks for, in as few words "
               "as a complete answer allows, with no preamble, examples or summary.",
    "verbose": "Answer in as much detail as possible: explain your reasoning step by step, add examples, "
               "background and caveats, and finish with a summary.",
}


def anchor_inputs(prompts: list[Prompt], data: DataSettings, style: str) -> tuple[list[Prompt], DataSettings]:
    """Prompts and data settings that make the model answer in `style` ("concise" or "verbose").

    String prompts get the instruction as the system prompt (after the configured one, if any);
    chat-message prompts get it prepended as a system message. Pass both to answer_prompts.
    """
    instruction = ANCHOR_INSTRUCTIONS[style]
    system = f"{data.system_prompt}\n\n{instruction}" if data.system_prompt else instruction
    styled = [p if isinstance(p.prompt, str) else replace(p, prompt=[{"role": "system", "content": instruction},
                                                                      *p.prompt]) for p in prompts]
    return styled, data.model_copy(update={"system_prompt": system})


def answer_anchors(model, tokenizer, prompts: list[Prompt], generation: GenerationSettings, data: DataSettings,
                   *, greedy: bool, seed: int, styles: tuple[str, ...] = tuple(ANCHOR_INSTRUCTIONS)
                   ) -> dict[str, list[dict[str, Any]]]:
    """{style: answer records} of the (base) model under each anchor instruction; ids as `prompts`."""
    out = {}
    for style in styles:
        styled, styled_data = anchor_inputs(prompts, data, style)
        out[style] = answer_prompts(model, tokenizer, styled, generation, styled_data, greedy=greedy, seed=seed,
                                    description=f"{style} anchor answers")
    return out


def cached_answers(path: Path, make) -> list[dict[str, Any]]:
    """Answer records from `path` if there (written whole, atomically: read strictly), else make()
    them and write them atomically."""
    if path.exists():
        return read_finished_jsonl(path, f"delete {path} and run the same command again to answer anew")
    rows = make()
    if ranks.is_main():
        write_jsonl(path, rows)
    return rows


Policy = Callable[[int], tuple[Any, Any]]  # iteration -> (model, tokenizer)


def evaluate_iteration(t: int, *, rundir: RunDir, config: Config, prompts: list[Prompt], judge: Scorer,
                       judge_settings: ScoringSettings, policy: Policy, compute_dtype: torch.dtype) -> dict:
    """iter_t/eval.json: pi_t's greedy answers to the eval prompts, judged, against
    pi_0 and pi_{t-1}, with the sampling and pairing figures of round t. At t = 0 also the
    initial model's length anchors, when eval.length_anchors is on."""
    result: dict = {"iteration": t}  # the alpha it trained with is state.json's (RunState.alpha)
    if t > 0:
        result.update(generation_stats(rundir, t))
    if prompts:
        gen = config.generation

        def answer(k: int, style: str | None = None) -> list[dict[str, Any]]:
            model, tokenizer = policy(k)
            styled, data = anchor_inputs(prompts, config.data, style) if style else (prompts, config.data)
            with autocast(next(model.parameters()).device, compute_dtype):
                rows = answer_prompts(model, tokenizer, styled, gen, data, greedy=True,
                                      seed=stage_seed(config.seed, k, "eval"), description=f"iter {k} eval" + (f" ({style})" if style else ""))
            return judge_answers(judge, prompts, rows, judge_settings)

        rows = cached_answers(rundir.file(t, "eval_answers.jsonl"), lambda: answer(t))
        if t == 0 and config.eval.length_anchors:
            for style, name in ANCHOR_FILES.items():
                cached_answers(rundir.file(0, name), lambda style=style: answer(0, style))
        result.update(_compare_with_baselines(t, rows, rundir, config, prompts, judge_settings))
        if t > 0 and (config.eval.judge or {}).get("type") == "llm" and ranks.is_main():
            result["vs_initial_llm"] = llm_comparison(t, rows, rundir, config, prompts)
        if config.experimental.eval_samples:
            result["sampled"] = _sampled_evaluation(t, rundir, config, prompts, judge, judge_settings, gen, policy,
                                                    compute_dtype)
        if config.experimental.perplexity:
            model, tokenizer = policy(0)
            with autocast(next(model.parameters()).device, compute_dtype):
                result.update(answer_perplexity(model, tokenizer, prompts, rows, config.data))
    if ranks.is_main():
        atomic_write_text(rundir.file(t, "eval.json"), json.dumps(result, indent=1))
    return result


def _sampled_evaluation(t: int, rundir: RunDir, config: Config, prompts: list[Prompt], judge: Scorer,
                        judge_settings: ScoringSettings, gen: GenerationSettings, policy: Policy,
                        compute_dtype: torch.dtype) -> dict:
    """eval.json "sampled": pi_t's experimental.eval_samples sampled answers per eval prompt (iter_t/eval_samples.jsonl),
    summarised over every answer, and against pi_0's sampled answers, with the earlier iterates' in
    the joint LC fit. Where iteration 0 has none (its eval shared from a run with another seed, or
    finished before experimental.eval_samples was set), pi_0's are drawn now and its eval.json completed.

    Win rates compare per prompt the mean over the samples (quality, reward, length), so the
    bootstrap interval resamples prompts, not the correlated answers to one prompt.
    """
    count = config.experimental.eval_samples
    inputs = sample_inputs(prompts, count)
    by_id = {p.id: p for p in prompts}

    def draw(k: int) -> list[dict[str, Any]]:
        model, tokenizer = policy(k)
        with autocast(next(model.parameters()).device, compute_dtype):
            rows = sample_prompts(model, tokenizer, prompts, gen, config.data, samples=count,
                                  seed=stage_seed(config.seed, k, "eval_samples"), description=f"iter {k} sampled eval")
        return judge_answers(judge, inputs, rows, judge_settings)

    def summary(rows: list[dict[str, Any]]) -> dict:
        return {**summarize(rows, [by_id[r["id"]] for r in rows], config.loss.length_unit),
                "samples_per_prompt": len(rows) // max(len({r["id"] for r in rows}), 1)}

    rows = cached_answers(rundir.file(t, SAMPLES_FILE), lambda: draw(t))
    result = summary(rows)
    if t == 0:
        return result
    initial_file = rundir.file(0, SAMPLES_FILE)
    if not initial_file.exists():
        initial = cached_answers(initial_file, lambda: draw(0))
        initial_eval = json.loads(rundir.file(0, "eval.json").read_text())
        if ranks.is_main():
            atomic_write_text(rundir.file(0, "eval.json"), json.dumps({**initial_eval, "sampled": summary(initial)},
                                                                      indent=1))
    drawn = {k: read_finished_jsonl(rundir.file(k, SAMPLES_FILE), rundir.redo_hint(k))
             for k in range(t) if rundir.file(k, SAMPLES_FILE).exists()}
    fits = compare_all({"this": per_prompt_means(rows), **{f"model_{k}": per_prompt_means(v)
                                                          for k, v in drawn.items() if k}},
                       per_prompt_means(drawn[0]), tie_tolerance=tie_tolerance(config))["this"]
    result["vs_initial"], result["vs_initial_quality"] = fits["reward"], fits["quality"]
    return result


@torch.no_grad()
def answer_perplexity(model, tokenizer, prompts: list[Prompt], rows: list[dict[str, Any]],
                      data: DataSettings) -> dict[str, Any]:
    """exp(-mean log-prob) of the answers' tokens under `model`, each answer in its prompt's
    context; past the model's context (capped at 2,048 tokens) a strided sliding window (half a
    window of stride) scores every answer token once."""
    from ilrdpo.generation import context_length
    from ilrdpo.logprobs import sliding_window_logprob

    window = min(context_length(model) or 2048, 2048)
    by_id = {p.id: p for p in prompts}
    total, count, windowed = 0.0, 0, 0
    was_training = model.training
    model.eval()
    for row in rows:
        if not row["response"]:
            continue
        prompt_ids = encode_prompt(tokenizer, by_id[row["id"]].prompt, data.use_chat_template, data.system_prompt)
        answer_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor(prompt_ids + answer_ids)
        logp, n = sliding_window_logprob(model, ids, window, window // 2, first=len(prompt_ids))
        total, count, windowed = total + logp, count + n, windowed + (len(ids) > window)
    model.train(was_training)
    return {"perplexity_initial": math.exp(-total / count) if count else None,
            "perplexity_tokens": count, "perplexity_windowed": windowed}


def _compare_with_baselines(t: int, rows, rundir: RunDir, config: Config, prompts: list[Prompt],
                            judge_settings: ScoringSettings) -> dict:
    """One joint LC fit per baseline (pi_0, pi_{t-1}): every iterate so far, plus pi_0's anchors."""
    tie, unit = tie_tolerance(config), config.loss.length_unit
    if t == 0:
        return evaluate_answers(rows, prompts, {}, tie, length_unit=unit)
    answers = {k: read_finished_jsonl(rundir.file(k, "eval_answers.jsonl"), rundir.redo_hint(k)) for k in range(t)}
    anchors = {style: read_finished_jsonl(rundir.file(0, name), rundir.redo_hint(0))
               for style, name in ANCHOR_FILES.items()
               if rundir.file(0, name).exists()}
    return evaluate_answers(rows, prompts, {"initial": answers[0], "previous": answers[t - 1]}, tie,
                            other_models={f"model_{k}": answers[k] for k in range(1, t)},
                            anchors={"initial": anchors} if anchors else None, length_unit=unit)


def llm_comparison(t: int, rows: list[dict[str, Any]], rundir: RunDir, config: Config,
                   prompts: list[Prompt]) -> dict:
    """pi_t's eval answers against pi_0's, judged pairwise by eval.judge's LLM (scoring.llm_judge;
    annotations cached in iter_t/llm_judge.jsonl): raw and LC win rates (lengths in characters)
    over the parsed judgements, with the count of unparseable ones."""
    from ilrdpo.scoring.llm_judge import build_pairwise_judge, win_rates_from

    initial = {r["id"]: r for r in read_finished_jsonl(rundir.file(0, "eval_answers.jsonl"), rundir.redo_hint(0))}
    by_id = {p.id: p for p in prompts}
    kept = [r for r in rows if r["id"] in initial and r["id"] in by_id]
    judge = build_pairwise_judge(config.judge_scorer(), rundir.file(t, "llm_judge.jsonl"))
    result = judge.judge([by_id[r["id"]] for r in kept], [r["response"] for r in kept],
                         [initial[r["id"]]["response"] for r in kept], seed=config.seed)
    return win_rates_from(result, [r["n_chars"] for r in kept], [initial[r["id"]]["n_chars"] for r in kept],
                          seed=config.seed)


def tie_tolerance(config: Config) -> float:
    """decisions.judge_tie_tolerance of this run's config: the rule `ilrdpo report` refits with."""
    return judge_tie_tolerance(config.eval.judge, config.scoring.model_dump())


def generation_stats(rundir: RunDir, t: int) -> dict:
    """Per-iteration sampling and pairing figures (gen/*, pairs/*) from the stage files."""
    rows = read_finished_jsonl(rundir.file(t, "candidates.jsonl"), rundir.redo_hint(t))
    pairs = read_finished_jsonl(rundir.file(t, "pairs.jsonl"), rundir.redo_hint(t))
    lengths = [n for r in rows for n in r["n_tokens"]]
    rewards = [x for r in rows for x in r.get("rewards", [])]
    return {
        "gen/length_mean": sum(lengths) / max(len(lengths), 1),
        "gen/reward_mean": sum(rewards) / max(len(rewards), 1),
        "gen/truncated_share": sum(t for r in rows for t in r["truncated"]) / max(len(lengths), 1),
        "gen/empty_share": sum(not x.strip() for r in rows for x in r["responses"]) / max(len(lengths), 1),
        "pairs/count": len(pairs),
        "pairs/reward_margin": sum(p["margin"] for p in pairs) / max(len(pairs), 1),
    }


def summary_line(s: dict) -> str:
    parts = [f"iter {s['iteration']}"] + ([f"alpha={s['alpha']:.3g}"] if s.get("alpha") is not None else [])
    if "pairs/count" in s:
        parts.append(f"pairs={s['pairs/count']}")
    if "reward_mean" in s:
        parts += [f"reward={s['reward_mean']:.4f}", f"quality={s['quality_mean']:.4f}",
                  f"length={s['length']['tokens_mean']:.1f}"]
    for name in ("initial", "previous"):
        if f"vs_{name}" in s:
            w = s[f"vs_{name}"]
            parts.append(f"win({name})={w['win_rate']:.1f}% lc={w['lc_win_rate']:.1f}%")
    if sampled := s.get("sampled"):
        parts.append(f"sampled: quality={sampled['quality_mean']:.4f} length={sampled['length']['tokens_mean']:.1f}"
                     + (f" win(initial)={sampled['vs_initial']['win_rate']:.1f}%" if "vs_initial" in sampled else ""))
    return "  ".join(parts)


def print_run_summary(rundir: RunDir, config: Config, summaries: list[dict]) -> None:
    """The end of a run: where the final model is, each iteration's line, what to run next."""
    for line in run_summary_lines(rundir, config, summaries):
        console.print(line, highlight=False)


def run_summary_lines(rundir: RunDir, config: Config, summaries: list[dict]) -> list[str]:
    """The final model, each iteration's line, and the report command."""
    lines = [f"final model: {rundir.file(config.iterations.count, 'model')}"]
    lines += ["  " + summary_line(summary) for summary in summaries]
    if any("vs_initial" in s for s in summaries):
        lines.append("  (each lc= was fitted when its iteration ended, over the iterations so far; "
                     "`ilrdpo report` fits once over all of them, so its LC win rates can differ)")
    lines.append(f"to write a report: ilrdpo report {rundir.root} --out {rundir.root / 'report'}")
    return lines

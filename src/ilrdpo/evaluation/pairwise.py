"""Answer a prompt set with a model, judge the answers, compare against a baseline's answers.

Used by `ilrdpo evaluate`, the loop's per-iteration evaluation and the report, so all three
report the same numbers. An answer record: id, response, n_tokens, n_chars, truncated, quality
(the judge's own score) and reward (quality plus the configured length bias, what training
optimises). The LC win rate is one joint fit over every model compared with the same baseline
(`compare_all`), on answer lengths in characters as in AlpacaEval (docs/lc.md).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ilrdpo.config import DataSettings, GenerationSettings, ScoringSettings
from ilrdpo.evaluation.lc import joint_lc
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


LC_LENGTH = "n_chars"  # the length the LC GLM controls for: characters, as AlpacaEval
# Length anchors (issue 10): the base model answers the eval prompts under these system prompts
# at iteration 0; judged against its plain answers, they pin the LC length slope.
ANCHOR_INSTRUCTIONS = {
    "concise": "Answer as briefly as possible: give only what the question asks for, in as few words "
               "as a complete answer allows, with no preamble, examples or summary.",
    "verbose": "Answer in as much detail as possible: explain your reasoning step by step, add examples, "
               "background and caveats, and finish with a summary.",
}
ANCHOR_FILES = {style: f"eval_answers_{style}.jsonl" for style in ANCHOR_INSTRUCTIONS}  # in iter_0/


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


def compare_all(rows_by_model: dict[str, list[dict[str, Any]]], baseline: list[dict[str, Any]], *,
                anchors: dict[str, list[dict[str, Any]]] | None = None, keys: tuple[str, ...] = ("reward", "quality"),
                tie_tolerance: float = 0.0, n_boot: int = 200, seed: int = 0) -> dict[str, dict[str, dict]]:
    """Raw and LC win rates of every model against `baseline`, the LC fitted jointly per key.

    rows_by_model: {name: answer records}; anchors: {name: answer records of a baseline variant}
    (the same baseline told to be concise / verbose). Only prompts answered by the baseline and
    by every model and anchor are used. Returns {name: {key: win_rates(...) dict}}, each with
    win_rate, win_rate_ci, lc_win_rate, lc_ci, the identifiability fields and lc_models /
    lc_anchors (what the joint fit included).
    """
    anchors = anchors or {}
    by_id = [{r["id"]: r for r in rows} for rows in (*rows_by_model.values(), *anchors.values())]
    ids = [r["id"] for r in baseline if all(r["id"] in table for table in by_id)]
    if not ids:
        raise ValueError("no prompt is answered by the baseline and every model")
    base = {r["id"]: r for r in baseline}
    base_len = [base[i][LC_LENGTH] for i in ids]
    series = dict(zip([*rows_by_model, *(("anchor", a) for a in anchors)], by_id))
    out: dict[str, dict[str, dict]] = {name: {} for name in rows_by_model}
    for key in keys:
        prefs = {name: pairwise_preferences([table[i][key] for i in ids], [base[i][key] for i in ids], tie_tolerance)
                 for name, table in series.items()}
        lengths = {name: [table[i][LC_LENGTH] for i in ids] for name, table in series.items()}
        fits = joint_lc({m: prefs[m] for m in rows_by_model}, {m: lengths[m] for m in rows_by_model}, base_len,
                        anchors={a: (prefs[("anchor", a)], lengths[("anchor", a)]) for a in anchors},
                        n_boot=n_boot, seed=seed)
        for name, fit in fits.items():
            out[name][key] = {**win_rates(prefs[name], lengths[name], base_len, n_boot=max(n_boot, 1000), seed=seed,
                                          lc=asdict(fit)),
                              "lc_length": LC_LENGTH, "lc_models": len(rows_by_model), "lc_anchors": sorted(anchors)}
    return out


def compare(rows: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str = "reward",
            tie_tolerance: float = 0.0, *, other_models: dict[str, list[dict[str, Any]]] | None = None,
            anchors: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Win rate and LC win rate of `rows` against `baseline` on `key`; with other_models and
    anchors, the LC comes from their joint fit (compare_all)."""
    this = "\0this"  # a name no caller's model can have
    return compare_all({this: rows, **(other_models or {})}, baseline, anchors=anchors, keys=(key,),
                       tie_tolerance=tie_tolerance)[this][key]


def summarize(rows: list[dict[str, Any]], prompts: list[Prompt], length_unit: str = "tokens") -> dict[str, Any]:
    """Mean reward and quality, length statistics and (with references) text metrics."""
    n = len(rows)
    summary: dict[str, Any] = {
        "n_prompts": n,
        "reward_mean": sum(r["reward"] for r in rows) / n,
        "quality_mean": sum(r["quality"] for r in rows) / n,
        "length": length_stats([r["n_tokens"] for r in rows], [r["n_chars"] for r in rows],
                               [r["truncated"] for r in rows], [p.target_length for p in prompts]
                               if any(p.target_length is not None for p in prompts) else None,
                               target_unit=length_unit),
    }
    references = [p.reference for p in prompts]
    summary["text"] = text_metrics([r["response"] for r in rows],
                                   references if all(references) else None)
    return summary


def evaluate_answers(rows: list[dict[str, Any]], prompts: list[Prompt],
                     baselines: dict[str, list[dict[str, Any]]], tie_tolerance: float = 0.0, *,
                     other_models: dict[str, list[dict[str, Any]]] | None = None,
                     anchors: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
                     n_boot: int = 200, length_unit: str = "tokens") -> dict[str, Any]:
    """summarize() plus, per named baseline, win rates on the biased reward and on quality.

    other_models: answer records of other models judged on the same prompts (e.g. earlier
    iterations), fitted jointly with `rows` for the LC; one identical to a baseline is skipped
    for that baseline. anchors: {baseline name: {anchor name: records}}, the baseline's length
    anchors (anchor_inputs); a baseline without an entry is fitted without anchors.
    """
    result = summarize(rows, prompts, length_unit)
    this = "\0this"
    for name, baseline in baselines.items():
        others = {m: r for m, r in (other_models or {}).items() if not _same_answers(r, baseline)}
        fits = compare_all({this: rows, **others}, baseline, anchors=(anchors or {}).get(name),
                           tie_tolerance=tie_tolerance, n_boot=n_boot)[this]
        result[f"vs_{name}"], result[f"vs_{name}_quality"] = fits["reward"], fits["quality"]
    return result


def _same_answers(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return [(r["id"], r.get("response")) for r in a] == [(r["id"], r.get("response")) for r in b]


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
                    greedy: bool = True, seed: int = 0, out_dir: Path | None = None,
                    anchors: bool = False) -> dict[str, Any]:
    """`ilrdpo evaluate`: answer the prompts with `model` (and `baseline`), judge both, compare.

    Models are hub ids, folders (full weights or LoRA adapters) or bundled names. Models are
    loaded one at a time. With out_dir, the answers are written there as JSONL. With anchors
    (and a baseline), the baseline also answers concisely and verbosely (two more passes) and
    those answers pin the LC length slope.
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
        if name == "baseline" and anchors:
            styled = answer_anchors(policy, tokenizer, prompts, generation, data, greedy=greedy, seed=seed)
            for style, styled_rows in styled.items():
                answers[f"anchor_{style}"] = judge_answers(scorer, prompts, styled_rows, judge)
                if out_dir is not None:
                    write_jsonl(Path(out_dir) / f"baseline_{style}_answers.jsonl", styled_rows)
        del policy
        if out_dir is not None:
            write_jsonl(Path(out_dir) / f"{name}_answers.jsonl", rows)
    result = {"model": model, "baseline": baseline, "prompts": prompts_path, "judge": judge.model_dump(),
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
            lc_ci = f" [{w['lc_ci'][0]:.1f}, {w['lc_ci'][1]:.1f}]" if w.get("lc_ci") else ""
            console.print(f"win rate ({label}): {w['win_rate']:.1f}% [{lo:.1f}, {hi:.1f}]  "
                          f"LC win rate: {w['lc_win_rate']:.1f}%{lc_ci}"
                          + (f"  ({w['lc_note']})" if w["lc_note"] else ""))

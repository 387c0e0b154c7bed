"""Compare judged answer records: summaries, raw and length-controlled win rates (pure metrics).

An answer record: id, response, n_tokens, n_chars, truncated, quality (the judge's own score)
and reward (quality plus the configured length bias, what training optimises). The LC win rate
is one joint fit over every model compared with the same baseline (`compare_all`), on answer
lengths in characters as in AlpacaEval (docs/lc.md). Nothing here loads a model.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ilrdpo.evaluation.lc import joint_lc
from ilrdpo.evaluation.lengths import length_stats
from ilrdpo.evaluation.text_metrics import text_metrics
from ilrdpo.evaluation.winrate import pairwise_preferences, win_rates
from ilrdpo.records import Prompt

LC_LENGTH = "n_chars"  # the length the LC GLM controls for: characters, as AlpacaEval


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


def per_prompt_means(rows: list[dict[str, Any]],
                     keys: tuple[str, ...] = ("quality", "reward", "n_tokens", "n_chars")) -> list[dict[str, Any]]:
    """One record per prompt id: the mean of each of `keys` over its answers (its sampled answers)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["id"], []).append(row)
    return [{"id": i, **{key: sum(r[key] for r in group) / len(group) for key in keys}} for i, group in groups.items()]

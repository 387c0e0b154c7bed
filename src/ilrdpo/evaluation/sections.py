"""Sections of report.md beyond the results table: alpha control's misses, text metrics,
training rounds (with what an IPO loss curve means), and the table and number formatting they
share with ilrdpo.evaluation.report."""

from __future__ import annotations

from typing import Any

from ilrdpo.evaluation.rundata import RunData

TEXT_METRICS = ("distinct_1", "distinct_2", "bleu", "chrf", "rouge1", "rouge2", "rougeL")


def fmt(value: Any, spec: str = ".4g") -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(headers: list[str], cells: list[list[str]]) -> list[str]:
    def line(values: list[str]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    return [line(headers), line(["---"] * len(headers)), *(line(row) for row in cells)]


def text_section(runs: list[RunData]) -> list[str]:
    present = {m for run in runs for ev in run.evals.values() for m in (ev.get("text") or {})}
    keys = [m for m in TEXT_METRICS if m in present]
    if not keys:
        return []
    cells = [[run.name, str(k), *(fmt((ev.get("text") or {}).get(m)) for m in keys)]
             for run in runs for k, ev in sorted(run.evals.items()) if ev.get("text")]
    return ["## Text metrics (eval answers)", "", *markdown_table(["run", "iteration", *keys], cells), ""]


IPO_NOTE = ("IPO (loss.type ipo) pulls each pair's margin (beta * delta plus the length term) to the target 1/2 "
            "instead of pushing it up for ever: its loss, ((margin - 1/2) / beta)^2, is not 0 where the policy "
            "equals the reference, and can rise while training trades pairs off against each other. A pair whose "
            "length term exceeds 1/2 (its chosen answer much longer) has a negative target for beta * delta and is "
            "learnt shorter-first, so a low pair accuracy there is the length term at work (reversed share), "
            "not a failure.")


def target_loss_note(runs: list[RunData]) -> str | None:
    """What a loss curve with a target margin means, for the runs that trained with IPO."""
    used = {((run.config.get("loss") or {}).get("type")) for run in runs if run.metrics}
    return IPO_NOTE if "ipo" in used else None


def training_section(runs: list[RunData]) -> list[str]:
    """Per training round: loss, reward margins, lengths, alpha and how often the length term
    saturated (|alpha * length gap| > 3 logits: those pairs' gradient is the length term's, not
    the preference's; a large share means alpha is too big for these length gaps) and, for losses
    with a target margin (IPO, cDPO), how many pairs it reversed (learnt shorter-first)."""
    cells = []
    for run in runs:
        for k, steps in sorted(run.metrics.items()):
            means = [fmt(sum(s.get(key, 0.0) for s in steps) / len(steps)) for key in
                     ("rewards/accuracies", "rewards/margins", "length/chosen", "length/rejected",
                      "length/margin_term")]
            shares = [[s[key] for s in steps if key in s]
                      for key in ("length/saturated_share", "length/reversed_share")]
            cells.append([run.name, str(k), str(len(steps)), fmt(run.alpha.get(k)), fmt(steps[0].get("loss")),
                          fmt(steps[-1].get("loss")), *means,
                          *(fmt(sum(v) / len(v), ".2f") if v else "-" for v in shares)])
    if not cells:
        return []
    headers = ["run", "iteration", "steps", "alpha", "first loss", "last loss", "mean rewards/accuracies",
               "mean rewards/margins", "mean length/chosen", "mean length/rejected", "mean length term",
               "saturated share", "reversed share"]
    return ["## Training (metrics.jsonl)", "",
            ("saturated share: share of pairs whose length term |alpha * length gap| exceeds 3 logits "
             "(the length term, not the preference, decides their gradient). reversed share: share of pairs "
             "whose length term exceeds the loss's target margin (IPO: 1/2), which the loss learns the other "
             "way round, shorter answer first; 0 for losses without one (DPO)."), "",
            *([target_loss_note(runs), ""] if target_loss_note(runs) else []),
            *markdown_table(headers, cells), ""]



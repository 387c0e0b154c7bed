"""Reading a run directory for the report: RunData and load_run.

A run directory is read as it is on disk, finished or not: whatever is absent (iterations still
to come, a stage killed half-way, an unreadable file) is listed in RunData.missing instead of
stopping the report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ilrdpo.errors import UserInputError
from ilrdpo.files import read_jsonl_tolerant
from ilrdpo.rundir import ANCHOR_FILES, RunDir

# Files of iteration k >= 1 and the stage (state.json name) that writes each.
ITERATION_FILES = (("candidates.jsonl", "generate"), ("pairs.jsonl", "pair"),
                   ("metrics.jsonl", "train"), ("eval.json", "eval"))


@dataclass
class RunData:
    """What the report reads from one run directory; dict keys are iteration numbers."""

    name: str
    path: Path
    config: dict[str, Any]
    dirs: dict[int, Path] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    answers: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    anchors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # iter_0 length anchors
    candidates: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    metrics: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    pairs_count: dict[int, int] = field(default_factory=dict)
    alpha: dict[int, float] = field(default_factory=dict)
    finished: dict[int, list[str]] = field(default_factory=dict)
    trainings: dict[int, int] = field(default_factory=dict)  # 1 + alpha control's retries of round k
    missing: list[str] = field(default_factory=list)
    trial: dict[str, Any] | None = None  # trial.json of a run that `ilrdpo tune` made

    @property
    def has_eval_prompts(self) -> bool:
        if self.config:
            return bool((self.config.get("eval") or {}).get("prompts")
                        or (self.config.get("data") or {}).get("eval_prompts"))
        return bool(self.answers or 0 in self.evals)

    @property
    def source(self) -> str:
        """Where answer lengths and rewards come from: "eval" answers or training "samples"."""
        return "eval" if self.has_eval_prompts else "samples"

    @property
    def iterations(self) -> list[int]:
        """Models with anything to show; model 0 also when only its training samples exist."""
        found = set(self.dirs) | set(self.evals)
        return sorted(found | ({0} if self.candidates.get(1) else set()))


# --- reading a run directory ---------------------------------------------------------------------


def _read_mapping(path: Path, problems: list[str], loader: Callable = json.loads) -> dict | None:
    """The parsed file (a JSON or YAML mapping), or None when absent; an unreadable file is
    noted in `problems`, not raised."""
    if not path.exists():
        return None
    try:
        data = loader(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, OSError) as error:
        problems.append(f"{path.parent.name}/{path.name}: unreadable ({type(error).__name__})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.parent.name}/{path.name}: unreadable (not a mapping)")
        return None
    return data


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Everything the report needs from a run directory written by `ilrdpo run`."""
    path = Path(path)
    rundir = RunDir(path)
    dirs = rundir.iterations() if path.is_dir() else {}
    if not (dirs or rundir.config_path.exists() or rundir.state_path.exists()):
        raise UserInputError(f"{path}: not a run directory (no config.yaml, state.json or iteration folders)")
    problems: list[str] = []
    config = _read_mapping(rundir.config_path, problems, yaml.safe_load) or {}
    state = _read_mapping(rundir.state_path, problems) or {}
    run = RunData(name=name or path.resolve().name, path=path, config=config, dirs=dirs,
                  finished={int(k): v for k, v in state.get("finished", {}).items()})
    for k in dirs:
        if (ev := _read_mapping(rundir.file(k, "eval.json"), problems)) is not None:
            run.evals[k] = ev
        for store, file_name in ((run.answers, "eval_answers.jsonl"), (run.candidates, "candidates.jsonl"),
                                 (run.metrics, "metrics.jsonl")):
            if rows := read_jsonl_tolerant(rundir.file(k, file_name)):
                store[k] = rows
        if rundir.file(k, "pairs.jsonl").exists():
            run.pairs_count[k] = len(read_jsonl_tolerant(rundir.file(k, "pairs.jsonl")))
    if 0 in dirs:
        run.anchors = {style: rows for style, file_name in ANCHOR_FILES.items()
                       if (rows := read_jsonl_tolerant(rundir.file(0, file_name)))}
    # The alpha each iteration trained with: state.json's (its one home); eval.json held a copy in
    # runs written before, read only where state.json has none.
    run.alpha = {k: float(ev["alpha"]) for k, ev in run.evals.items() if ev.get("alpha") is not None}
    run.alpha.update({int(k): float(v) for k, v in state.get("alpha", {}).items() if int(k) in dirs and v is not None})
    run.trainings = {int(k): 1 + len(v) for k, v in state.get("attempts", {}).items()}
    if rundir.trial_path.exists():
        run.trial = _read_mapping(rundir.trial_path, problems)
    run.missing = _missing_items(run, bool(state)) + problems
    return run


def load_runs(run_dirs: list[Path], names: list[str] | None = None) -> list[RunData]:
    if names is not None and len(names) != len(run_dirs):
        raise UserInputError(f"{len(names)} names given for {len(run_dirs)} run directories")
    runs = [load_run(path, name) for path, name in zip(run_dirs, names or [None] * len(run_dirs))]
    seen: dict[str, int] = {}
    for run in runs:  # two folders called "run" in different places must stay apart in legends
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"
    return runs


def _missing_items(run: RunData, has_state: bool) -> list[str]:
    name = RunDir.iteration_name
    items = []
    if not run.config:
        items.append("config.yaml: settings and the planned number of iterations are unknown")
    if not has_state:
        items.append("state.json: finished stages and alpha unknown (alpha from eval.json where an older run wrote it there)")
    if not run.has_eval_prompts:
        items.append("eval prompts: none configured, so no eval answers and no win rates; length, "
                     "reward and quality come from the training samples (†)")
    elif 0 not in run.evals:
        items.append(f"{name(0)}/eval.json: the initial model's evaluation (no win rates vs initial)")
    planned = (run.config.get("iterations") or {}).get("count") or 0
    items += [f"{name(k)}/: iteration {k} has not run yet" for k in range(1, planned + 1) if k not in run.dirs]
    for k, d in run.dirs.items():
        done = run.finished.get(k, [])
        for file_name, stage_name in ITERATION_FILES if k > 0 else ():
            if not (d / file_name).exists():
                why = "marked finished in state.json" if stage_name in done else "not finished"
                items.append(f"{name(k)}/{file_name}: stage '{stage_name}' {why}")
        if run.has_eval_prompts and k not in run.answers:
            items.append(f"{name(k)}/eval_answers.jsonl: no eval answers for model {k}")
    return items

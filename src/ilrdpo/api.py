"""The Python API: the CLI's commands as functions, for notebooks and scripts.

train_pairs (`ilrdpo train`), run (`ilrdpo run`), evaluate_model (`ilrdpo evaluate`). The names
differ from the commands' where a submodule has the command's name (ilrdpo.train, ilrdpo.evaluate).

    import ilrdpo

    result = ilrdpo.train_pairs({"model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}, "loss": {"alpha": 0.01}},
                          pairs=dataset, output_dir="runs/x")
    summaries = ilrdpo.run("my.yaml", prompts=["What is osmosis?", ...], scorer=my_reward_fn)

A config is a dict (YAML-level sections), a Config, a path to a YAML file, or None for the
defaults; `overrides` are `section.key` -> value, as on the command line. Data given as
Python objects (lists of dicts, PreferencePair or Prompt records, a `datasets.Dataset`) is
checked like a file, then written into the run directory (OUT/inputs/) so that the run is
recorded and resumable like any other. A scorer may be a callable with TRL's reward-function
signature, fn(prompts, completions, **kwargs) -> list[float].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilrdpo import engines, ranks
from ilrdpo.config import Config, ScoringSettings, build_config, load_config, override
from ilrdpo.files import write_jsonl
from ilrdpo.records import PreferencePair, Prompt, pair_from_row, prompt_from_row
from ilrdpo.rundir import RunDir
from ilrdpo.train import TrainResult

ConfigLike = Config | Mapping[str, Any] | str | Path | None


@dataclass
class TrainOutput:
    model_dir: Path
    result: TrainResult


def make_config(config: ConfigLike = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """A Config from any ConfigLike, with `section.key` overrides applied."""
    if isinstance(config, Config):
        base = config.model_dump(mode="json")
    elif isinstance(config, (str, Path)):
        base = load_config(config).model_dump(mode="json")
    else:
        base = dict(config or {})
    return build_config(base, [override(key, value) for key, value in (overrides or {}).items()],
                        source="python api")


def _rows(data: Iterable) -> list[dict[str, Any]]:
    """Records, dicts or a datasets.Dataset as plain row dicts (unset optional fields left out)."""
    rows = []
    for row in data:
        fields = vars(row) if isinstance(row, (PreferencePair, Prompt)) else dict(row)
        rows.append({k: v for k, v in fields.items() if v is not None})
    return rows


def _materialise(rows: list[dict[str, Any]], parse, out: Path, name: str) -> str:
    """Check every row as the file reader would, then write them to OUT/inputs/NAME."""
    for index, row in enumerate(rows):
        parse(row, f"{name}: row {index}")
    path = RunDir(out).inputs_dir / name
    if ranks.is_main():
        write_jsonl(path, rows)
    return str(path)


def _prompt_rows(prompts: Iterable) -> list[dict[str, Any]]:
    """Prompt strings or message lists become {"prompt": ...}; dicts and records pass through."""
    return [{"prompt": p} if isinstance(p, (str, list)) else _rows([p])[0] for p in prompts]


def train_pairs(config: ConfigLike = None, *, pairs: Iterable | None = None, overwrite: bool = False,
          overrides: Mapping[str, Any] | None = None, **sections: Any) -> TrainOutput:
    """`ilrdpo train`: one round of LR-DPO. pairs: dicts with prompt/chosen/rejected (or TRL's
    conversational and implicit-prompt layouts), PreferencePair records or a datasets.Dataset;
    default config.data.pairs. Keyword sections (output_dir="runs/x", loss={"alpha": 0.01})
    are merged into the config."""
    from ilrdpo.offline import run_offline

    engines.init()  # under accelerate launch / torchrun: join the processes
    config = make_config(_merge(config, sections), overrides)
    if pairs is not None:
        path = _materialise(_rows(pairs), pair_from_row, Path(config.output_dir), "pairs.jsonl")
        ranks.barrier()  # the main process wrote it
        config = config.model_copy(update={"data": config.data.model_copy(update={"pairs": path})})
    model_dir, result = run_offline(config, overwrite=overwrite)
    return TrainOutput(model_dir, result)


def run(config: ConfigLike = None, *, prompts: Iterable | None = None, eval_prompts: Iterable | None = None,
        scorer: Callable | None = None, force: bool = False, redo: str | None = None,
        overrides: Mapping[str, Any] | None = None, **sections: Any) -> list[dict]:
    """`ilrdpo run`: the iterative loop; returns one summary per evaluated model (eval.json).
    prompts / eval_prompts: strings, message lists, dicts like a prompts file's lines, or Prompt
    records. scorer: a reward function fn(prompts, completions, **kwargs) -> list[float].
    redo: "ITER:STAGE", as `ilrdpo run --redo`."""
    from ilrdpo.loop import run_iterations
    from ilrdpo.resume import parse_redo
    from ilrdpo.scoring.python_fn import PythonScorer

    engines.init()  # under accelerate launch / torchrun: join the processes
    config = make_config(_merge(config, sections), overrides)
    out, data = Path(config.output_dir), {}
    for key, given, name in (("prompts", prompts, "prompts.jsonl"), ("eval_prompts", eval_prompts, "eval.jsonl")):
        if given is not None:
            data[key] = _materialise(_prompt_rows(given), prompt_from_row, out, name)
    if data:
        ranks.barrier()  # the main process wrote them
        config = config.model_copy(update={"data": config.data.model_copy(update=data)})
    if scorer is not None:
        config = config.model_copy(update={"scoring": config.scoring.model_copy(update={"type": "python"})})
        scorer = PythonScorer(config.scoring, fn=scorer)
    point = parse_redo(redo) if redo is not None else None
    return run_iterations(config, force=force, scorer=scorer, redo=point)


def evaluate_model(model: str, prompts: str, *, judge: Mapping[str, Any] | None = None, baseline: str | None = None,
             anchors: bool = False, greedy: bool = True, seed: int = 0) -> dict:
    """`ilrdpo evaluate`: win rate and LC win rate of `model` against `baseline` on a prompts file."""
    from ilrdpo.evaluate import evaluate_models

    return evaluate_models(model, prompts, ScoringSettings.model_validate(dict(judge or {})), baseline=baseline,
                           greedy=greedy, seed=seed, anchors=anchors)


def _merge(config: ConfigLike, sections: Mapping[str, Any]) -> ConfigLike:
    if not sections:
        return config
    base = make_config(config).model_dump(mode="json")
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(value, Mapping) and isinstance(base.get(key), dict) else value
    return base

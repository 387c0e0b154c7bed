"""Which finished work a config change touches, and how to redo from a stage.

A finished stage was computed with the values of the config keys it reads (STAGE_SECTIONS) and
those of every earlier stage; from iteration 2 on, also with everything that shaped the previous
model. A rerun with a changed key under finished work is refused, naming the key, the first
stage computed with the old value and the `--redo ITER:STAGE` that recomputes from there.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ilrdpo import ranks
from ilrdpo.config import Config, GenerationSettings
from ilrdpo.errors import UserInputError
from ilrdpo.progress import console
from ilrdpo.rundir import STAGES, RunDir
from ilrdpo.runstate import RunState

# The config keys each stage reads (tests/test_loop_stages.py records what each stage reads and
# fails on a key missing here). A finished stage depends on its own keys and every earlier
# stage's; from iteration 2 on, also on everything that shaped the previous model. An input
# file's content counts as the key that names it plus ".sha256".
STAGE_SECTIONS = {
    "generate": ("model", "data.prompts", "data.use_chat_template",
                 "data.system_prompt", "generation", "seed"),
    "score": ("scoring",),
    "pair": ("pairing", "loss.target_length"),  # 'base' puts each prompt's target into its pairs
    "train": ("loss", "train", "iterations.reference", "iterations.alpha_control", "experimental.alpha_neutral"),
    "eval": ("eval", "data.eval_prompts", "loss.length_unit", "experimental.perplexity",
             "experimental.eval_samples"),
}
assert list(STAGE_SECTIONS) == STAGES
# Keys that change how a stage runs, never what it computes.
NEUTRAL_KEYS = {"train.save_steps", "train.report_to", "iterations.keep_models"}
SAMPLING_KEYS = ("temperature", "top_p", "top_k")


def initial_eval_dependencies(config: Config | None = None) -> tuple[str, ...]:
    """What iteration 0's evaluation (the initial model's eval answers, judged) reads: the model,
    the eval set and its formatting, the judge, and the generation keys its decoding uses: never
    num_samples; not the sampling keys when the eval draws no samples (its answers are greedy)."""
    config = config or Config()
    skip = {"num_samples"}
    if not config.experimental.eval_samples:
        skip.update(SAMPLING_KEYS)
    generation = tuple(f"generation.{k}" for k in GenerationSettings.model_fields if k not in skip)
    # a judge of its own still scores with the scoring section's comparison and ties
    judge = ("scoring",) if config.eval.judge is None else ("scoring.tie_tolerance",)
    return ("model", "data.use_chat_template", "data.system_prompt", "seed", *generation, *judge,
            *STAGE_SECTIONS["eval"])


def stage_dependencies(iteration: int, stage_name: str, config: Config | None = None) -> tuple[str, ...]:
    """Config key prefixes whose values a finished (iteration, stage) was computed with."""
    if iteration == 0:
        return initial_eval_dependencies(config)
    upto = STAGES.index(stage_name) + 1
    if iteration >= 2:
        upto = max(upto, STAGES.index("train") + 1)
    return tuple(p for s in STAGES[:upto] for p in STAGE_SECTIONS[s])


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    key = key.removesuffix(".sha256")
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(old: Config, new: Config, old_inputs: dict[str, str] | None = None,
                 new_inputs: dict[str, str] | None = None) -> dict[str, tuple[object, object]]:
    """{key: (old value, new value)} of every config key (and input-file hash) that differs."""
    old_flat = {**_flatten(old.model_dump(mode="json")), **(old_inputs or {})}
    new_flat = {**_flatten(new.model_dump(mode="json")), **(new_inputs or {})}
    return {k: (old_flat.get(k), new_flat.get(k)) for k in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(k) != new_flat.get(k) and k not in NEUTRAL_KEYS}


def first_reader(key: str, touched: dict[int, list[str]], config: Config) -> tuple[int, str] | None:
    """The earliest touched (iteration, stage), in run order, that was computed with `key`."""
    for t in sorted(touched):
        for name in STAGES:
            if name in touched[t] and _matches(key, stage_dependencies(t, name, config)):
                return t, name
    return None


def owner(key: str) -> str:
    """The stage that reads `key` itself."""
    return next((s for s in STAGES if _matches(key, STAGE_SECTIONS[s])), "eval")


def check_resume(old: Config, new: Config, finished: dict[int, list[str]], force: bool, *,
                 old_inputs: dict[str, str] | None = None, new_inputs: dict[str, str] | None = None) -> None:
    """Refuse a config or input-file change that touches finished work, unless forced.

    The message names the key, the stage that reads it, the first finished stage whose output
    was computed with the old value, and the redo that recomputes from that stage.
    """
    if force:
        return
    changes = changed_keys(old, new, old_inputs, new_inputs)
    hits = [(hit, key) for key in changes if (hit := first_reader(key, finished, old)) is not None]
    if not hits:
        return
    # the earliest stage any change reaches: redoing from there recomputes everything they touch
    (t, name), key = min(hits, key=lambda h: (h[0][0], STAGES.index(h[0][1])))
    before, after = changes[key]
    if key.endswith(".sha256"):
        what = f"the file named by '{key.removesuffix('.sha256')}' changed (content hash differs)"
    else:
        what = f"config key '{key}' changed ({before!r} -> {after!r})"
    reader = owner(key)
    also = " (and iteration 0's evaluation, which decodes with it)" if t == 0 and reader != "eval" else ""
    raise UserInputError(
        f"{new.output_dir}: {what}; stage '{reader}' reads it{also}, and iteration {t} already ran "
        f"'{name}' with the old value; to recompute from there with the new value add `--redo {t}:{name}` "
        "(the replaced files are kept in replaced/), or use --force to keep the finished work, "
        "or a new output_dir")


def parse_redo(text: str) -> tuple[int, str]:
    """`--redo ITER:STAGE` (or ITER alone: its first stage) -> (iteration, stage)."""
    iteration, _, name = text.strip().partition(":")
    name = name.strip().lower()
    if not iteration.strip().isdigit():
        raise UserInputError(f"option '--redo': {text!r} is not ITER:STAGE (e.g. 1:generate; stages "
                             f"{', '.join(STAGES)})")
    t = int(iteration)
    name = name or ("eval" if t == 0 else STAGES[0])
    if name not in STAGES:
        raise UserInputError(f"option '--redo': unknown stage {name!r}; stages are {', '.join(STAGES)}")
    if t == 0 and name != "eval":
        raise UserInputError("option '--redo': iteration 0 has only the stage 'eval' (the initial model's "
                             "evaluation)")
    return t, name


def after(t: int, stage_name: str, point: tuple[int, str]) -> bool:
    """(t, stage_name) is at or after `point` in run order."""
    return (t, STAGES.index(stage_name)) >= (point[0], STAGES.index(point[1]))


def drop_from(state: RunState, point: tuple[int, str]) -> dict[int, list[str]]:
    """Un-mark every stage at or after `point` = (iteration, stage), in run order, with the alpha
    a dropped train stage decided; returns what was dropped. Not saved."""
    dropped = {t: [s for s in names if after(t, s, point)] for t, names in state.touched().items()}
    dropped = {t: names for t, names in dropped.items() if names}
    for t, names in dropped.items():
        state.forget(t, tuple(names))
        if "train" in names:
            for record in (state.alpha, state.alpha_setting, state.attempts):
                record.pop(t, None)
    return dropped


def check_redo(point: tuple[int, str], config: Config, rundir: RunDir, state: RunState, has_eval: bool) -> None:
    """Refuse a redo point the run cannot compute from (before anything is moved)."""
    t, _ = point
    if t > config.iterations.count:
        raise UserInputError(f"option '--redo': iteration {t} is past iterations.count={config.iterations.count}")
    if t == 0 and not has_eval:
        raise UserInputError("option '--redo': iteration 0 is the initial model's evaluation, and this run has no "
                             "data.eval_prompts")
    # generate..train start from model t-1; eval alone evaluates model t
    needed = t - 1 if after(t, "train", point) else t
    if needed >= 1 and state.done(needed, "train") and not rundir.file(needed, "model").is_dir():
        raise UserInputError(f"option '--redo': iteration {needed}'s model, which the redo starts from, was removed "
                             "(iterations.keep_models); redo from an earlier iteration, or set keep_models higher "
                             "for the next run")


def apply_redo(point: tuple[int, str], rundir: RunDir, state: RunState) -> None:
    """Move the files of `point` and every later stage to replaced/NNN/, then un-mark them in
    state.json (killed in between: the same command finishes the job)."""
    dropped = drop_from(state, point)
    note = (f"replaced by `ilrdpo run --redo {point[0]}:{point[1]}` on {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            + "; ".join(f"iteration {t}: {' '.join(names)}" for t, names in sorted(dropped.items())))
    folder = rundir.replace(dropped, note) if ranks.is_main() else None
    state.save()
    ranks.barrier()
    if not dropped:
        console.print(f"redo {point[0]}:{point[1]}: nothing had run from there yet")
    elif folder is not None:
        console.print(f"redo from iteration {point[0]}, stage '{point[1]}': the replaced files are in {folder}")


def redo_command(config: Config, point: tuple[int, str], override: str) -> str:
    """The command that redoes from `point` with `override`, from the run's own recorded config."""
    return f"ilrdpo run {config.output_dir}/config.yaml --redo {point[0]}:{point[1]} {override}"


def no_pairs_message(census: dict[str, int], config: Config, t: int, touched: dict[int, list[str]]) -> str:
    """Iteration t's pairing found nothing: the measured causes, largest first, and the redo that
    changes the setting behind the largest one (from the first stage that read the old value)."""
    gen, n = config.generation, census["answers"]
    hotter = f"generation.temperature={round(min(max(gen.temperature + 0.4, 1.0), 1.5), 2)}"
    causes = {  # cause -> (count, what it says, the override that addresses it)
        "cut": (census["cut"] if config.pairing.skip_truncated else 0,
                (f"{census['cut']} of {n} answers were cut at generation.max_new_tokens={gen.max_new_tokens} "
                 "(pairing.skip_truncated leaves them out)"),
                f"generation.max_new_tokens={gen.max_new_tokens * 2}"),
        "empty": (census["empty"], f"{census['empty']} of {n} answers are empty (the model ended at once)", hotter),
        "identical": (census["identical"], f"{census['identical']} of {census['prompts']} prompts got identical answers",
                      hotter),
        "tied": (census["tied"], (f"{census['tied']} of {census['prompts']} prompts got tied rewards (within "
                                  f"scoring.tie_tolerance={config.scoring.tie_tolerance})"), f"generation.num_samples={gen.num_samples * 2}"),
    }
    ranked = sorted(causes.values(), key=lambda c: -c[0])
    said = "; ".join(text for count, text, _ in ranked if count) or f"{n} answers, no usable pair"
    override = ranked[0][2]
    point = first_reader(override.partition("=")[0], touched, config) or (t, "generate")
    return (f"no preference pairs in iteration {t}: {said}. To sample again with "
            f"{override}: {redo_command(config, point, override)}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_hashes(config: Config) -> dict[str, str]:
    """{config key + '.sha256': content hash} of every input file the config names."""
    files = {"data.prompts": config.data.prompts, "data.eval_prompts": config.data.eval_prompts,
             "scoring.function": _function_file(config.scoring.function),
             "eval.judge.function": _function_file((config.eval.judge or {}).get("function"))}
    return {f"{key}.sha256": file_sha256(path) for key, path in files.items()
            if path and Path(path).is_file()}


def _function_file(spec: str | None) -> str | None:
    """The .py file of a 'file.py:fn' scorer (a module scorer has no single file to hash)."""
    if not spec:
        return None
    target = spec.rpartition(":")[0]
    return target if target.endswith(".py") else None

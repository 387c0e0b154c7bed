"""Resume checks: which config keys each stage reads, and the refusal of a change under finished work.

A run directory (ilrdpo.rundir) records the config and the hash of every input file it ran with;
a later start compares them with the new ones here (check_resume), naming the key, the stage
that reads it and the finished stage computed with the old value.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ilrdpo.config import Config
from ilrdpo.errors import UserInputError
from ilrdpo.rundir import STAGES


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The config keys each stage reads (tests/test_loop_stages.py records what each stage reads and
# fails on a key missing here). A finished stage depends on its own keys and every earlier
# stage's; from iteration 2 on, also on everything that shaped the previous model. An input
# file's content counts as the key that names it plus ".sha256".
STAGE_SECTIONS = {
    "generate": ("model", "data.prompts", "data.max_examples", "data.use_chat_template",
                 "data.system_prompt", "data.on_long_prompt", "generation", "seed"),
    "score": ("scoring",),
    "pair": ("pairing", "loss.target_length"),  # 'base' puts each prompt's target into its pairs
    "train": ("loss", "train", "iterations.reference", "iterations.alpha_control", "experimental.alpha_neutral"),
    "eval": ("eval", "data.eval_prompts", "loss.length_unit", "experimental.perplexity"),
}
assert list(STAGE_SECTIONS) == STAGES
# Keys that change how a stage runs, never what it computes.
NEUTRAL_KEYS = {"train.save_steps", "train.report_to", "train.run_name", "train.project"}


def stage_dependencies(iteration: int, stage_name: str) -> tuple[str, ...]:
    """Config key prefixes whose values a finished (iteration, stage) was computed with."""
    upto = STAGES.index(stage_name) + 1
    if iteration >= 2:
        upto = max(upto, STAGES.index("train") + 1)
    deps = tuple(p for s in STAGES[:upto] for p in STAGE_SECTIONS[s])
    if iteration == 0:  # the initial model's eval answers: model, generation, judge, eval set
        deps = STAGE_SECTIONS["generate"] + STAGE_SECTIONS["score"] + STAGE_SECTIONS["eval"]
    return deps


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(old: Config, new: Config, finished: dict[int, list[str]], force: bool, *,
                 old_inputs: dict[str, str] | None = None, new_inputs: dict[str, str] | None = None) -> None:
    """Refuse a config or input-file change that touches finished work, unless forced.

    The message names the key, the stage that reads it and the first finished stage whose
    output was computed with the old value.
    """
    if force:
        return
    old_flat = {**_flatten(old.model_dump(mode="json")), **(old_inputs or {})}
    new_flat = {**_flatten(new.model_dump(mode="json")), **(new_inputs or {})}
    changed = [k for k in sorted(set(old_flat) | set(new_flat))
               if old_flat.get(k) != new_flat.get(k) and k not in NEUTRAL_KEYS]
    for iteration, stages in sorted(finished.items()):
        for stage_name in stages:
            hit = next((k for k in changed if _matches(k, stage_dependencies(iteration, stage_name))), None)
            if hit is None:
                continue
            owner = next((s for s in STAGES if _matches(hit.removesuffix(".sha256"), STAGE_SECTIONS[s])), stage_name)
            if hit.endswith(".sha256"):
                what = f"the file named by '{hit.removesuffix('.sha256')}' changed (content hash differs)"
            else:
                what = f"config key '{hit}' changed ({old_flat.get(hit)!r} -> {new_flat.get(hit)!r})"
            raise UserInputError(
                f"{new.output_dir}: {what}; stage '{owner}' reads it, and iteration {iteration} already ran "
                f"'{stage_name}' with the old value; use --force to continue anyway, or a new output_dir")


def input_hashes(config: Config) -> dict[str, str]:
    """{config key + '.sha256': content hash} of every input file the config names."""
    files = {"data.prompts": config.data.prompts, "data.eval_prompts": config.data.eval_prompts,
             "scoring.function": _function_file(config.scoring.function),
             "eval.judge.function": _function_file(config.eval.judge.function if config.eval.judge else None)}
    return {f"{key}.sha256": file_sha256(path) for key, path in files.items()
            if path and Path(path).is_file()}


def _function_file(spec: str | None) -> str | None:
    """The .py file of a 'file.py:fn' scorer (a module scorer has no single file to hash)."""
    if not spec:
        return None
    target = spec.rpartition(":")[0]
    return target if target.endswith(".py") else None

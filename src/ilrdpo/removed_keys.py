"""Config keys that existed once: a config using one gets one line saying what to use instead; a
run directory's recorded config.yaml written before a key went still loads where the key held a
value that changed nothing (and moved keys move).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ilrdpo.errors import UserInputError
from ilrdpo.lora import renamed
from ilrdpo.settings import ScoringSettings

# REMOVED_KEYS inert values: a removed key that changed nothing at any value, or at the value the
# scoring section holds under the same name (the judge's own copies of scoring keys).
ANY_VALUE = "any value"
AS_SCORING = "the scoring section's value"
API_KEY = "$OPENAI_API_KEY (the key for every server the config names)"

# Keys that existed once: a config using one gets one line saying what to use instead.
# key -> (what to use, the value at which it changed nothing: a run directory's recorded config
# holding that value still loads). Scoring keys count for eval.judge too.
REMOVED_KEYS: dict[str, tuple[str, Any]] = {
    "loss.no_reversal": (
        "nothing: capping the length term lost the length in the demo's study (docs/demo/study.md)", False),
    "loss.alpha_relative": (
        "loss.alpha per unit of length, or experimental.alpha_neutral (relative alpha lost in the study)", False),
    "loss.alpha_neutral": ("experimental.alpha_neutral", False),
    "eval.perplexity": ("experimental.perplexity", False),
    "eval.samples": ("experimental.eval_samples", 0),
    "scoring.length_bias": (
        "a scorer of your own (scoring.type python); the simulated verbosity bias is the demo's judge now", 0.0),
    "scoring.length_bias_cap": ("nothing (it went with scoring.length_bias)", ANY_VALUE),
    "scoring.selection_length_penalty": ("loss.alpha (a length margin in the loss)", 0.0),
    "train.packing": ("nothing: it rarely found two pairs for one row; prefix sharing stays", ANY_VALUE),
    "model.allow_pickle": ("a safetensors copy of the checkpoint (the refusal of a pickle says how to make one)",
                           False),
    "model.attn_implementation": ("nothing: transformers chooses the attention (sdpa where it can)", ANY_VALUE),
    "data.pairs_split": ("data.pairs: NAME:SPLIT", "train"),
    "data.on_long_prompt": ("nothing: a prompt longer than the context keeps its end, counted in a warning",
                            "truncate"),
    "generation.no_repeat_ngram_size": ("nothing: answers are sampled as the model gives them", 0),
    "generation.repetition_penalty": ("nothing: answers are sampled as the model gives them", 1.0),
    "pairing.min_margin": ("scoring.tie_tolerance (reward differences within it make no pair)", 0.0),
    "train.run_name": ("$WANDB_NAME (default: the run directory's name)", ANY_VALUE),
    "run_name": ("$WANDB_NAME (default: the run directory's name)", ANY_VALUE),
    "train.project": ("$WANDB_PROJECT", ANY_VALUE),
    "train.logits_chunk": ("nothing: the log-prob head runs in chunks of 1024 answer positions", ANY_VALUE),
    "train.prefix_sharing": ("nothing: the layout measured faster on the device is chosen (benchmarks/README.md)",
                             ANY_VALUE),
    "eval.baseline": ("nothing: eval.json compares with both the initial and the previous iterate", ANY_VALUE),
    "eval.greedy": ("experimental.eval_samples for sampled eval answers (the eval answers are greedy)", True),
    "eval.max_new_tokens": ("generation.max_new_tokens", None),
    "scoring.compare_to": ("scoring.type prompt_similarity (embedding_similarity compares with the reference)",
                           "reference"),
    "eval.judge.batch_size": ("scoring.batch_size (the judge scores in batches of that size)", ANY_VALUE),
    "eval.judge.tie_tolerance": ("scoring.tie_tolerance (one tolerance for pairing and judging)", AS_SCORING),
    "tune.sampler": ("nothing: the sampler follows from the objectives and trials (GP, TPE or NSGA-II)",
                     ANY_VALUE),
    "tune.prune": ("nothing: a one-objective study prunes between iterations", ANY_VALUE),
    "iterations.alpha_control.retries": (
        "nothing: alpha control now decides each round's alpha before training, from the round's sampled lengths", 0),
    "iterations.alpha_control.gain": (
        "nothing: alpha control's gain is fixed at 0.5; each change is at most 20%", 0.5),
    "iterations.alpha_control.min_alpha": ("nothing: alpha control's lower bound is 0", 0.0),
    "iterations.alpha_control.tolerance": ("nothing (it went with iterations.alpha_control.retries)", ANY_VALUE),
    "train.max_prompt_length": (
        "nothing: a pair over train.max_length keeps its prompt's end in the room its answers leave, at least half",
        None),
    "max_prompt_length": ("nothing (as in TRL's DPOConfig): a pair over max_length keeps its prompt's end", None),
    "data.max_examples": ("a slice, data.pairs NAME:train[:N], or a file of the first N lines (head -n N)", None),
    "iterations.alpha_control.mode": (
        "iterations.alpha_control.budget (set: alpha control on; null: loss.alpha in every round)", "constant"),
    "iterations.alpha_control.step": ("nothing: alpha control moves alpha by at most 20% per round", 0.2),
    "iterations.alpha_control.max_alpha": ("nothing: alpha control keeps alpha within 4 x loss.alpha", ANY_VALUE),
    "iterations.alpha_control.response": ("nothing (it went with iterations.alpha_control.retries)", ANY_VALUE),
    "model.merge_lora": (("nothing: a LoRA run saves adapters (merge one with PEFT's PeftModel.from_pretrained(base, "
                          "folder).merge_and_unload()); with generation.server.command each round is also saved "
                          "merged"), ANY_VALUE),
    # a key authenticates, it never changes an answer; the scoring row covers eval.judge.api_key_env
    "generation.server.api_key_env": (API_KEY, ANY_VALUE),
    "scoring.api_key_env": (API_KEY, ANY_VALUE),
    "generation.server.timeout": (
        "nothing: a started server is waited for while its process lives, an answer up to 600 s", ANY_VALUE),
}
MOVED_KEYS = {"loss.alpha_neutral": "experimental.alpha_neutral", "eval.perplexity": "experimental.perplexity",
              "eval.samples": "experimental.eval_samples"}


def _removed_in(data: dict[str, Any]) -> list[tuple[list[str], str, Any]]:
    """(path as written, key in REMOVED_KEYS, value) of every removed key in a config mapping;
    a removed scoring key also counts under eval.judge."""
    found = []
    for key in REMOVED_KEYS:
        parts = key.split(".")
        paths = [parts] + ([["eval", "judge", parts[1]]] if parts[0] == "scoring" else [])
        for path in paths:
            holder: Any = data
            for part in path[:-1]:
                holder = holder.get(part) if isinstance(holder, dict) else None
            if isinstance(holder, dict) and path[-1] in holder:
                found.append((path, key, holder[path[-1]]))
    return found


def refuse_removed_keys(data: dict[str, Any], source: str, *, file: bool = False) -> None:
    """One line naming the first removed key a config sets, and what to use instead; file: the
    config is a file `ilrdpo config-migrate` can rewrite, and the line says so."""
    for path, key, _ in _removed_in(data):
        hint = f" (`ilrdpo config-migrate {source}` rewrites the file)" if file else ""
        raise UserInputError(f"{source}: config key '{'.'.join(path)}' was removed; use {REMOVED_KEYS[key][0]}{hint}")


@dataclass(frozen=True)
class Loss:
    """A removed key whose value changed what a run computed: dropped by the migration."""
    key: str
    value: str  # as shown
    use: str


def _migrate_alpha_control(data: dict[str, Any], losses: list[Loss]) -> None:
    """iterations.alpha_control as written before mode went: mode constant is budget null (step and
    max_alpha changed nothing); mode auto keeps its budget, a loss unless its law is today's (step
    0.2, at most 4 x loss.alpha)."""
    control = (data.get("iterations") or {}).get("alpha_control")
    if not isinstance(control, dict) or "mode" not in control:
        return
    mode, step, cap = control.pop("mode"), control.pop("step", 0.2), control.pop("max_alpha", None)
    if mode == "constant":
        control["budget"] = None
        return
    control.setdefault("budget", 1.0)  # the former default
    alpha = (data.get("loss") or {}).get("alpha", 0.0)
    if step != 0.2 or cap is None or abs(cap - 4 * alpha) > 1e-12 * max(cap, 1.0):
        losses.append(Loss("iterations.alpha_control", f"step {step!r}, max_alpha {cap!r}",
                           "iterations.alpha_control.budget: alpha control now moves alpha by at most 20% per "
                           "round, within 4 x loss.alpha"))


def _migrate_compare_to(data: dict[str, Any], losses: list[Loss]) -> None:
    """scoring.compare_to as written before it became a scorer type: prompt makes an
    embedding_similarity scorer (and a judge, which compared as the scoring section) prompt_similarity."""
    scoring = data.get("scoring") if isinstance(data.get("scoring"), dict) else {}
    judge = (data.get("eval") or {}).get("judge") if isinstance(data.get("eval"), dict) else None
    compare = scoring.pop("compare_to", "reference")
    if isinstance(judge, dict) and (own := judge.pop("compare_to", compare)) != compare:
        losses.append(Loss("eval.judge.compare_to", repr(own), "scoring.type prompt_similarity or "
                           "embedding_similarity (the judge compares as its type says)"))
    for section in (scoring, judge):
        if compare == "prompt" and isinstance(section, dict) and \
                section.get("type", "embedding_similarity") == "embedding_similarity":
            section["type"] = "prompt_similarity"


def migrate(data: dict[str, Any]) -> tuple[dict[str, Any], list[Loss]]:
    """A config written before keys were removed, in today's keys: moved keys go to their new place,
    renamed ones are renamed (model.lora's short names, alpha control's mode, compare_to), removed
    keys are dropped; each dropped key whose value changed what a run computed is a Loss."""
    data, losses = copy.deepcopy(data), []
    _migrate_alpha_control(data, losses)
    _migrate_compare_to(data, losses)
    if isinstance(data.get("model"), dict) and "lora" in data["model"]:
        data["model"]["lora"] = renamed(data["model"]["lora"])
    for path, key, value in _removed_in(data):
        holder = data
        for part in path[:-1]:
            holder = holder[part]
        del holder[path[-1]]
        inert = REMOVED_KEYS[key][1]
        if inert == AS_SCORING:
            inert = (data.get("scoring") or {}).get(path[-1], ScoringSettings.model_fields[path[-1]].default)
        if key in MOVED_KEYS and path == key.split("."):
            section, name = MOVED_KEYS[key].split(".")
            data.setdefault(section, {})[name] = value
        elif inert != ANY_VALUE and value != inert:
            losses.append(Loss(".".join(path), repr(value), REMOVED_KEYS[key][0]))
    return data, losses


def migrate_recorded(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A run directory's config.yaml written before keys were removed (migrate); a removed key whose
    value changed the run refuses the resume in one line."""
    data, losses = migrate(data)
    for loss in losses:
        raise UserInputError(f"{source}: config key '{loss.key}' ({loss.value}) was removed; this run directory "
                             f"cannot be resumed with this version (use {loss.use})")
    return data

"""Typed configuration: YAML plus `section.key=value` overrides, read into the schema of
ilrdpo.settings (re-exported here, so `from ilrdpo.config import Config` is the one import).

An unknown key anywhere is an error that names it; a removed key is an error that says what to use.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ilrdpo.errors import UserInputError
from ilrdpo.lora import LoraKeyError, renamed
from ilrdpo.records import lone_surrogate
from ilrdpo.settings import (
    MAX_LEARNING_RATE,
    SECTION_NAMES,
    AlphaControlSettings,
    Config,
    DataSettings,
    EvalSettings,
    ExperimentalSettings,
    GenerationSettings,
    IterationSettings,
    LossSettings,
    ModelSettings,
    PairingSettings,
    ScoringSettings,
    SearchDimension,
    ServerSettings,
    TrainSettings,
    TuneSettings,
)

__all__ = [
    "REMOVED_KEYS",
    "TRL_ALIASES",
    "AlphaControlSettings",
    "Config",
    "DataSettings",
    "EvalSettings",
    "ExperimentalSettings",
    "GenerationSettings",
    "IterationSettings",
    "LossSettings",
    "ModelSettings",
    "PairingSettings",
    "ScoringSettings",
    "SearchDimension",
    "ServerSettings",
    "TrainSettings",
    "TuneSettings",
    "all_keys",
    "build_config",
    "config_to_yaml",
    "explain_validation_error",
    "field_docs",
    "load_config",
    "merged_settings",
    "parse_overrides",
    "read_config_file",
]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings to a nested dict; values are parsed as YAML (numbers, bools, lists, null)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"override {item!r}: expected section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, ValueError):  # ValueError: e.g. an impossible date such as 2001-02-30
            value = raw
        if isinstance(value, dict) and not raw.lstrip().startswith("{"):
            value = raw  # "Answer: briefly" is text, not a mapping
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserInputError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def explain_validation_error(error: ValidationError, source: str) -> str:
    """One line naming the first bad key: the message of every config-file error."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if isinstance(lora_error := (first.get("ctx") or {}).get("error"), LoraKeyError):
        return lora_error.line(source, key)
    if first["type"] == "extra_forbidden":
        near = difflib.get_close_matches(key, [*all_keys(), *TRL_ALIASES, *SECTION_NAMES], n=1, cutoff=0.6)
        return f"{source}: unknown config key '{key}'" + (f" (did you mean '{near[0]}'?)" if near else "")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "finite_number":
        message = "must be a finite number, not NaN or infinity"
    elif key == "train.learning_rate" and first["type"] == "less_than_equal":
        message = (f"{first['input']} is too high (at most {MAX_LEARNING_RATE}); preference fine-tuning "
                   "uses 1e-7 to 1e-4, LoRA up to about 1e-3")
    return f"{source}: config key '{key}': {message}" if key else f"{source}: {message}"


# TRL's DPOConfig names, accepted at the top level (as in a DPOConfig) or in their section.
TRL_ALIASES = {
    "learning_rate": "train.learning_rate", "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "max_length": "train.max_length",
    "warmup_ratio": "train.warmup_ratio", "lr_scheduler_type": "train.lr_scheduler",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing", "report_to": "train.report_to",
    "save_steps": "train.save_steps", "beta": "loss.beta", "loss_type": "loss.type",
    "label_smoothing": "loss.label_smoothing", "ld_alpha": "loss.ld_alpha", "simpo_gamma": "loss.simpo_gamma",
    "model_name_or_path": "model.name_or_path", "push_to_hub": "model.push_to_hub",
    "hub_model_id": "model.push_to_hub",
}

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


def refuse_removed_keys(data: dict[str, Any], source: str) -> None:
    """One line naming the first removed key a config sets, and what to use instead."""
    for path, key, _ in _removed_in(data):
        raise UserInputError(f"{source}: config key '{'.'.join(path)}' was removed; use {REMOVED_KEYS[key][0]}")


def _migrate_alpha_control(data: dict[str, Any], source: str) -> None:
    """iterations.alpha_control as recorded before mode went: mode constant is budget null (step and
    max_alpha changed nothing); mode auto keeps its budget where its law is today's (step 0.2, at
    most 4 x loss.alpha); another law is refused."""
    control = (data.get("iterations") or {}).get("alpha_control")
    if not isinstance(control, dict) or "mode" not in control:
        return
    mode, step, cap = control.pop("mode"), control.pop("step", 0.2), control.pop("max_alpha", None)
    if mode == "constant":
        control["budget"] = None
        return
    alpha = (data.get("loss") or {}).get("alpha", 0.0)
    if step != 0.2 or cap is None or abs(cap - 4 * alpha) > 1e-12 * max(cap, 1.0):
        raise UserInputError(f"{source}: config key 'iterations.alpha_control' (step {step!r}, max_alpha {cap!r}) "
                             "was removed; this run directory cannot be resumed with this version (alpha control "
                             "now moves alpha by at most 20% per round, within 4 x loss.alpha)")


def _migrate_compare_to(data: dict[str, Any], source: str) -> None:
    """scoring.compare_to as recorded before it became a scorer type: prompt makes an
    embedding_similarity scorer (and a judge, which compared as the scoring section) prompt_similarity."""
    scoring = data.get("scoring") if isinstance(data.get("scoring"), dict) else {}
    judge = (data.get("eval") or {}).get("judge") if isinstance(data.get("eval"), dict) else None
    compare = scoring.pop("compare_to", "reference")
    if isinstance(judge, dict) and judge.pop("compare_to", compare) != compare:
        raise UserInputError(f"{source}: config key 'eval.judge.compare_to' was removed; this run directory "
                             "cannot be resumed with this version (the judge compares as the scoring section)")
    for section in (scoring, judge):
        if compare == "prompt" and isinstance(section, dict) and \
                section.get("type", "embedding_similarity") == "embedding_similarity":
            section["type"] = "prompt_similarity"


def migrate_recorded(data: dict[str, Any], source: str) -> dict[str, Any]:
    """A run directory's config.yaml written before keys were removed: moved keys go to their new
    place, removed keys at a value that changed nothing are dropped, any other is refused;
    model.lora's former short names become PEFT's."""
    data = copy.deepcopy(data)
    _migrate_alpha_control(data, source)
    _migrate_compare_to(data, source)
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
            raise UserInputError(f"{source}: config key '{'.'.join(path)}' ({value!r}) was removed; this run "
                                 f"directory cannot be resumed with this version (use {REMOVED_KEYS[key][0]})")
    return data


def all_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted config key."""
    keys = []
    for name, field in (model or Config).model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += all_keys(annotation, f"{prefix}{name}.")
            continue
        keys.append(f"{prefix}{name}")
    return keys


def apply_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """Move TRL-named keys (top level or inside their section) to the project's keys."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for alias, target in TRL_ALIASES.items():
        section, _, name = target.rpartition(".")
        places = [(data, alias)] + ([(data[section], alias)] if isinstance(data.get(section), dict) else [])
        for holder, key in places:
            if key not in holder:
                continue
            value = holder.pop(key)
            if alias == "report_to" and isinstance(value, str):
                value = [] if value == "none" else [value]
            node = data.setdefault(section, {}) if section else data
            if name in node and node[name] != value:
                raise UserInputError(f"config keys '{alias}' (TRL's name) and '{target}' are both set, to different "
                                     "values; keep one")
            node[name] = value
    return data


def merged_settings(data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> dict[str, Any]:
    """A config's settings with the overrides applied and TRL's names resolved, not yet validated;
    a removed key (in the file or an override) is one line saying what to use."""
    # A section whose keys are all commented out reads as null: treat it as empty.
    data = {k: ({} if v is None and k in SECTION_NAMES else v) for k, v in data.items()}
    refuse_removed_keys(data, source)
    extra = parse_overrides(overrides or [])
    refuse_removed_keys(extra, "command line")
    # aliases resolved per source, so a command-line `beta` overrides a file's `loss.beta`
    return _merge(apply_aliases(data), apply_aliases(extra))


def build_config(data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> Config:
    data = merged_settings(data, overrides, source)
    _check_text(data, source)
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise UserInputError(explain_validation_error(error, source)) from None


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The settings of a YAML config file (none when path is None)."""
    if path is None:
        return {}
    loaded = _read_yaml(Path(path))
    if loaded is not None and not isinstance(loaded, dict):
        raise UserInputError(f"{path}: expected a mapping of sections at the top level")
    return loaded or {}


def _check_text(value: Any, source: str, key: str = "") -> None:
    """Text settings (a system prompt reaches the tokenizer; every value goes into config.yaml):
    a lone surrogate, from a YAML escape or an undecodable command-line byte, is not text."""
    if isinstance(value, str) and (at := lone_surrogate(value)) is not None:
        raise UserInputError(f"{source}: config key '{key}' holds U+{ord(value[at]):04X} at character {at + 1}, "
                             "a lone surrogate that is not text; remove it or write the whole character")
    if isinstance(value, dict):
        for name, item in value.items():
            _check_text(item, source, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, source, f"{key}[{i}]")


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, recorded: bool = False) -> Config:
    """Read a YAML config (or defaults when path is None) and apply overrides. recorded: a run
    directory's own config.yaml, which may predate removed keys (migrate_recorded)."""
    source = "command line" if path is None else str(path)
    data = read_config_file(path)
    if recorded:
        data = migrate_recorded(data, source)
    return build_config(data, overrides, source)


def _read_yaml(path: Path) -> Any:
    """The YAML document of a config file; every way it can be unreadable is one line naming it."""
    if path.is_dir():
        raise UserInputError(f"{path}: is a folder, expected a YAML config file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"{path}: config file not found") from None
    except OSError as error:
        raise UserInputError(f"{path}: cannot read config file ({error.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise UserInputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x}); "
                             "save the file as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserInputError(f"{path}{where}: invalid YAML") from None
    except (ValueError, RecursionError) as error:  # a value YAML parses but cannot build, e.g. 2001-02-30
        raise UserInputError(f"{path}: invalid YAML value ({str(error)[:80] or type(error).__name__})") from None


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def field_docs(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field: the config reference."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(field_docs(annotation, key + "."))
            continue
        default = field.default_factory() if field.default_factory else field.default
        rows.append((key, repr(default), field.description or ""))
    if not prefix:
        rows += [(alias, "", f"TRL's DPOConfig name, accepted for {target}") for alias, target in TRL_ALIASES.items()]
    return rows

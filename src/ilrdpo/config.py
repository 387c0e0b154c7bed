"""Typed configuration: YAML plus `section.key=value` overrides, read into the schema of
ilrdpo.settings (re-exported here, so `from ilrdpo.config import Config` is the one import).

An unknown key anywhere is an error that names it; a removed key is an error that says what to use.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ilrdpo.errors import UserInputError
from ilrdpo.lora import LoraKeyError
from ilrdpo.records import lone_surrogate
from ilrdpo.removed_keys import REMOVED_KEYS, migrate, migrate_recorded, refuse_removed_keys
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
    "migrate_config_file",
    "override",
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


def override(key: str, value: Any) -> str:
    """`key=value` with the value written as YAML: parse_overrides reads it back as the same value."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


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


def read_config_file(path: str | Path | None, *, recorded: bool = False) -> dict[str, Any]:
    """The settings of a YAML config file (none when path is None). A user's file holding a removed
    key is one line that names `ilrdpo config-migrate`; a run directory's own (recorded) is migrated
    by the caller."""
    if path is None:
        return {}
    loaded = _read_yaml(Path(path))
    if loaded is not None and not isinstance(loaded, dict):
        raise UserInputError(f"{path}: expected a mapping of sections at the top level")
    if not recorded:
        refuse_removed_keys(loaded or {}, str(path), file=True)
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


def migrate_config_file(path: str | Path) -> tuple[str, list[str]]:
    """`ilrdpo config-migrate`: a config file written before keys were removed, as today's YAML
    (removed_keys.migrate; it must load), and one line per dropped key that changed what a run
    computes, saying what to use instead."""
    written = read_config_file(path, recorded=True)
    migrated, losses = migrate(written)
    migrated = {k: v for k, v in migrated.items() if v != {} or written.get(k) == {}}  # sections left empty go
    build_config(migrated, source=f"{path} (migrated)")
    notes = [f"{loss.key}: {loss.value} dropped (it changed what a run computes); use {loss.use}" for loss in losses]
    return yaml.safe_dump(migrated, sort_keys=False, allow_unicode=True), notes


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, recorded: bool = False) -> Config:
    """Read a YAML config (or defaults when path is None) and apply overrides. recorded: a run
    directory's own config.yaml, which may predate removed keys (migrate_recorded)."""
    source = "command line" if path is None else str(path)
    data = read_config_file(path, recorded=recorded)
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

"""model.lora: a mapping of PEFT LoraConfig keyword arguments over the project's defaults,
checked against LoraConfig's own fields when the config is read (so a bad one never starts a run).

peft takes seconds to import: it is imported here, lazily, only when a config sets model.lora, so
`ilrdpo config-help` and configs without LoRA never load it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any

from pydantic import PydanticUserError, TypeAdapter, ValidationError

# Applied under whatever the user sets: `model.lora: {}` is this adapter.
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
TASK_TYPE = "CAUSAL_LM"
# The section's former short names -> PEFT's (a run directory's recorded config is renamed silently).
RENAMED = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
# Today's bounds on the defaults' keys (PEFT itself checks them only when it builds the adapter).
BOUNDS = {"r": (lambda v: v > 0, "must be greater than 0"),
          "lora_alpha": (lambda v: v > 0, "must be greater than 0"),
          "lora_dropout": (lambda v: 0 <= v < 1, "must be at least 0 and below 1")}
# Set by PEFT or the tool, never by a config.
NOT_SETTABLE = {"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}


class LoraKeyError(ValueError):
    """A bad model.lora field: `field` names it, the message says what is wrong."""

    def __init__(self, field: str, message: str, unknown: bool = False):
        super().__init__(message)
        self.field, self.unknown = field, unknown

    def line(self, source: str, section: str) -> str:
        key = f"{section}.{self.field}"
        if self.unknown:
            return f"{source}: unknown config key '{key}'{self.args[0]}"
        return f"{source}: config key '{key}': {self.args[0]}"


def renamed(lora: Any) -> Any:
    """A recorded model.lora with the former short names under PEFT's (alpha -> lora_alpha)."""
    if not isinstance(lora, dict):
        return lora
    return {RENAMED.get(name, name): value for name, value in lora.items()}


def resolve_lora(lora: Any) -> dict[str, Any] | None:
    """The model.lora mapping a config holds: the defaults under the user's fields, sorted by name
    (what config.yaml records), each field checked against PEFT's LoraConfig; None = no LoRA."""
    if lora is None:
        return None
    if not isinstance(lora, dict):  # a ValueError: pydantic reports it as the key's error
        raise ValueError(f"expected a mapping of PEFT LoraConfig arguments (e.g. {{r: 16}}) or null for "  # noqa: TRY004
                         f"full fine-tuning, not {lora!r}")
    for name in lora:
        if name == "task_type":
            raise LoraKeyError(name, f"is set by ilrdpo ({TASK_TYPE}); remove it")
        if name in RENAMED:
            raise LoraKeyError(name, f"is PEFT's {RENAMED[name]} now; write model.lora.{RENAMED[name]}")
    fields = lora_fields()
    for name, value in lora.items():
        _check_field(name, value, fields)
    resolved = dict(sorted({**LORA_DEFAULTS, **lora}.items()))
    if (refusal := _refusal(resolved)) is not None:
        # the field PEFT refuses over the defaults alone, where one does; else the combination
        field = next((name for name in lora if _refusal({**LORA_DEFAULTS, name: lora[name]})), None)
        raise LoraKeyError(field, f"PEFT refuses it: {refusal}") if field else ValueError(f"PEFT refuses it: {refusal}")
    return resolved


def _refusal(lora: dict[str, Any]) -> str | None:
    """PEFT's own objection (first line) to building LoraConfig from the mapping; None if it builds."""
    try:
        lora_config(lora)
    except (TypeError, ValueError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def _check_field(name: str, value: Any, fields: dict[str, Any]) -> None:
    """One field against its LoraConfig annotation (strict: 4.0 is not a rank) and today's bounds."""
    if name not in fields:
        near = difflib.get_close_matches(name, [*fields, *RENAMED], n=1, cutoff=0.6)
        suggestion = f" (did you mean 'model.lora.{RENAMED.get(near[0], near[0])}'?)" if near else ""
        raise LoraKeyError(name, suggestion, unknown=True)
    if name == "init_lora_weights" and re.fullmatch("pissa_niter" + r"_\d+", str(value)):
        return  # PEFT's annotation spells this choice as a placeholder, 'pissa_niter_[number of iters]'
    try:
        adapter = TypeAdapter(fields[name])
    except PydanticUserError:  # an annotation pydantic cannot check: PEFT's own checks decide
        return
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError as error:
        raise LoraKeyError(name, f"{value!r}: {error.errors()[0]['msg'].lower()}") from None
    if name in BOUNDS and not BOUNDS[name][0](value):
        raise LoraKeyError(name, f"{value!r} {BOUNDS[name][1]}")


def lora_fields() -> dict[str, Any]:
    """LoraConfig's settable fields and their annotations."""
    from peft import LoraConfig  # lazy: seconds to import, needed only with model.lora

    hints = typing.get_type_hints(LoraConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(LoraConfig)
            if f.init and f.name not in NOT_SETTABLE and f.name != "task_type"}


def lora_config(lora: dict[str, Any]):
    """PEFT's LoraConfig of a resolved model.lora mapping, for a causal language model."""
    from peft import LoraConfig  # lazy: see the module docstring

    return LoraConfig(**lora, task_type=TASK_TYPE)

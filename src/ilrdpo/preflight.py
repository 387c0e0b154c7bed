"""Checks that run before any model is loaded or any file is written.

Everything that can be known from the config and the input files alone is checked here, so a
bad input costs seconds, not a model load or a sampling pass, and never touches a run directory.
"""

from __future__ import annotations

from typing import Literal

from ilrdpo.config import Config
from ilrdpo.errors import UserInputError

Command = Literal["run", "train"]


def check_config(config: Config, command: Command) -> None:
    """Settings a command needs; raises UserInputError naming the key."""
    if command == "train" and not config.data.pairs:
        raise UserInputError("data.pairs is required for `ilrdpo train` (a JSONL file or a dataset)")
    if command == "run":
        if not config.data.prompts:
            raise UserInputError("data.prompts is required for `ilrdpo run`")
        if config.iterations.alpha_control.mode == "auto" and not (config.eval.prompts or config.data.eval_prompts):
            raise UserInputError("iterations.alpha_control.mode=auto needs eval prompts (data.eval_prompts)")

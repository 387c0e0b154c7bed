"""A user's scoring function, imported only because the config names it.

scoring.function: "path/to/file.py:fn" or "package.module:fn"; called as
fn(prompts: list[Prompt], responses: list[str]) -> list[float]. Each Prompt has .prompt
(string or messages), .id, .reference and .target_length.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ilrdpo.config import ScoringSettings
from ilrdpo.errors import UserInputError
from ilrdpo.records import Prompt


def load_function(spec: str):
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UserInputError(f"scoring.function '{spec}': expected 'file.py:fn' or 'package.module:fn'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserInputError(f"scoring.function: file '{path}' not found")
        module_spec = importlib.util.spec_from_file_location(f"ilrdpo_user_scorer_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise UserInputError(f"scoring.function: cannot import '{target}' ({error})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserInputError(f"scoring.function: '{name}' is not a function in '{target}'")
    return fn


class PythonScorer:
    def __init__(self, settings: ScoringSettings) -> None:
        if not settings.function:
            raise UserInputError("scoring.function is required for scoring.type=python")
        self.fn = load_function(settings.function)
        self.spec = settings.function

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        scores = list(self.fn(prompts, responses))
        if len(scores) != len(responses):
            raise UserInputError(f"scoring.function '{self.spec}' returned {len(scores)} scores "
                                 f"for {len(responses)} answers")
        return [float(s) for s in scores]

"""A user's scoring function: imported only because the config names it, or passed as a callable.

scoring.function: "path/to/file.py:fn" or "package.module:fn". The function has TRL's
reward-function signature,

    fn(prompts, completions, **kwargs) -> list[float]

with prompts as strings or message lists (as in the prompts file) and completions as strings;
the prompts file's other columns arrive as keyword lists, one value per completion: id,
reference, target_length (each passed only if the function names it or takes **kwargs).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

from ilrdpo.config import ScoringSettings
from ilrdpo.errors import UserInputError
from ilrdpo.records import Prompt


def _split(spec: str, key: str = "scoring.function") -> tuple[str, str]:
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise UserInputError(f"{key} '{spec}': expected 'file.py:fn' or 'package.module:fn'")
    return target, name


def _syntax_error(error: SyntaxError, fallback: str) -> UserInputError:
    return UserInputError(f"{error.filename or fallback}:{error.lineno or 1}: syntax error in the scoring "
                          f"function's file ({error.msg})")


def check_function_file(spec: str, key: str = "scoring.function") -> None:
    """Before anything runs: the spec's form, and for a .py file that it exists and compiles
    (compiled, not executed: the code runs only when the scorer is built)."""
    target, _ = _split(spec, key)
    if not target.endswith(".py"):
        return
    path = Path(target)
    if not path.is_file():
        raise UserInputError(f"{key}: file '{path}' not found")
    try:
        compile(path.read_bytes(), str(path), "exec")
    except SyntaxError as error:
        raise _syntax_error(error, str(path)) from None
    except ValueError as error:  # source with NUL bytes
        raise UserInputError(f"{path}: cannot compile the scoring function's file ({error})") from None


def load_function(spec: str):
    target, name = _split(spec)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserInputError(f"scoring.function: file '{path}' not found")
        module_spec = importlib.util.spec_from_file_location(f"ilrdpo_user_scorer_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as error:
            raise _syntax_error(error, str(path)) from None
        except Exception as error:  # noqa: BLE001 - the user's module may raise anything at import
            raise UserInputError(f"scoring.function: importing '{path}' raised {type(error).__name__}: "
                                 f"{_first_line(error)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except SyntaxError as error:
            raise _syntax_error(error, target) from None
        except ImportError as error:
            raise UserInputError(f"scoring.function: cannot import '{target}' ({error})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserInputError(f"scoring.function: '{name}' is not a function in '{target}'")
    return fn


COLUMNS = ("id", "reference", "target_length")  # prompt-file columns passed as keyword lists


def call_reward_function(fn: Callable, prompts: list[Prompt], completions: list[str]):
    """fn(prompts, completions, **columns) in TRL's form: prompts as text or messages."""
    parameters = inspect.signature(fn).parameters.values()
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    named = {p.name for p in parameters}
    columns = {name: [getattr(p, name) for p in prompts] for name in COLUMNS if takes_all or name in named}
    return fn([p.prompt for p in prompts], completions, **columns)


class PythonScorer:
    """Scores with a user function: named in the config (settings.function) or given as `fn`."""

    def __init__(self, settings: ScoringSettings, fn: Callable | None = None) -> None:
        if fn is None and not settings.function:
            raise UserInputError("scoring.function is required for scoring.type=python")
        self.fn = fn if fn is not None else load_function(settings.function)
        self.spec = settings.function or getattr(fn, "__name__", "callable")
        self.name = f"scoring.function '{self.spec}'"

    def score(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        where = f"scoring.function '{self.spec}'"
        try:
            returned = call_reward_function(self.fn, prompts, responses)
        except Exception as error:  # noqa: BLE001 - the user's code: its failure is theirs to fix, as one line
            first = f", first prompt '{prompts[0].id}'" if prompts else ""
            raise UserInputError(f"{where} raised {type(error).__name__}: {_first_line(error)} "
                                 f"(scoring {len(responses)} answers{first})") from None
        try:
            scores = list(returned)
        except TypeError:
            raise UserInputError(f"{where} returned {type(returned).__name__}, expected a list of numbers") from None
        if len(scores) != len(responses):
            raise UserInputError(f"{where} returned {len(scores)} scores "
                                 f"for {len(responses)} answers")
        for index, score in enumerate(scores):
            if isinstance(score, bool) or not isinstance(score, (int, float)) and not _is_numeric(score):
                raise UserInputError(f"{where} returned {score!r} ({type(score).__name__}) for prompt "
                                     f"'{prompts[index].id}', expected a number")
        return [float(s) for s in scores]


def _is_numeric(value) -> bool:
    """numpy and torch scalars count as numbers; strings, None and containers do not."""
    return hasattr(value, "__float__") and not isinstance(value, (str, bytes)) and getattr(value, "ndim", 0) == 0


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "(no message)"

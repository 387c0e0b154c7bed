"""Small importable helpers shared by the tests."""

import json
import os
from pathlib import Path

# The per-step metric names DESIGN.md promises (TRL's names where TRL has one).
DESIGN_METRICS = {"loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
                  "rewards/accuracies", "logps/chosen", "logps/rejected", "length/chosen", "length/rejected",
                  "length/margin_term"}

TESTS = Path(__file__).resolve().parents[1]
SCORER = TESTS / "helpers" / "scorer.py"  # scoring functions for scoring.type=python
EXAMPLES = TESTS.parent / "examples"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def first_lines(source: Path, n: int, folder: Path) -> Path:
    """A copy of a JSONL file's first n lines in folder (a run on a subset of examples/)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{source.stem}_{n}{source.suffix}"
    path.write_text("".join(source.read_text().splitlines(keepends=True)[:n]))
    return path


def short_pairs(n: int = 12) -> list:
    """n pairs with a short on-topic chosen answer and a longer rejected one."""
    from ilrdpo.records import PreferencePair

    return [PreferencePair(prompt=f"Question {i}?", chosen=f"Answer {i}.", rejected=f"Something else entirely, {i}!")
            for i in range(n)]


def constant_rate(**overrides):
    """TrainSettings: one epoch of single-pair steps at a constant lr 5e-7, no warmup."""
    from ilrdpo.config import TrainSettings

    values = {"learning_rate": 5e-7, "epochs": 1, "batch_size": 1, "warmup_ratio": 0.0,
              "lr_scheduler": "constant", "max_length": 128}
    return TrainSettings(**{**values, **overrides})


def crash_after(monkeypatch, fault: str, work) -> None:
    """Run work() with ILRDPO_FAULT=fault and check that it "died" there (ilrdpo.faults)."""
    import pytest

    from ilrdpo.faults import SimulatedCrash, reset

    reset()
    monkeypatch.setenv("ILRDPO_FAULT", fault)
    with pytest.raises(SimulatedCrash):
        work()
    monkeypatch.delenv("ILRDPO_FAULT")


def console_script() -> list[str]:
    """The installed `ilrdpo` console script of this interpreter's environment."""
    import sys

    script = Path(sys.executable).parent / "ilrdpo"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ilrdpo.cli"]


def call_main(monkeypatch, argv: list[str]) -> int:
    """`ilrdpo ARGV` through cli.main() in this process (the console script's own code path, without
    an interpreter's start-up); the exit status, 0 when main() returns. An exception that escapes
    main() is a traceback a user would see, so it propagates and fails the test."""
    import sys

    from ilrdpo import cli

    monkeypatch.setattr(sys, "argv", ["ilrdpo", *argv])
    try:
        cli.main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """A folder built once per test session and shared by every pytest-xdist worker: the first
    worker to ask runs build(folder) under a file lock, the others wait for it and reuse the result.
    Callers treat it as read-only (copy it before changing anything)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is per worker; its parent is the session's
        root = root.parent
    folder, done = root / f"shared_{name}", root / f"shared_{name}.done"
    with FileLock(str(root / f"shared_{name}.lock")):
        if not done.exists():
            if folder.exists():  # a build that failed half-way in another worker
                import shutil

                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder

"""Small importable helpers shared by the tests."""

import json
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

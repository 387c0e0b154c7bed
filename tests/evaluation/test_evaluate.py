"""`ilrdpo evaluate` end to end: two real (tiny, random) models answer, a judge scores both."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import call_main

PROMPTS = [{"id": f"p{i}", "prompt": q, "reference": r} for i, (q, r) in enumerate([
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Define gravity in one sentence.", "Gravity is the force that attracts masses to each other."),
    ("How many days are in a week?", "A week has seven days."),
    ("Why is the sea salty?", "Rivers carry dissolved minerals into the sea, where they accumulate."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
])]

JUDGE = """\
def score(prompts, responses):
    # more distinct words is better, a deterministic stand-in for a reward model
    return [float(len(set(r.split()))) for r in responses]
"""


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with different random weights: a different baseline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("baseline_model")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def run_cli(monkeypatch, *args: str) -> None:
    assert call_main(monkeypatch, list(args)) == 0


@pytest.fixture()
def files(tmp_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    (tmp_path / "judge.py").write_text(JUDGE)
    judge = tmp_path / "judge.yaml"
    judge.write_text(f"type: python\nfunction: {tmp_path / 'judge.py'}:score\n")
    return prompts, judge


def test_evaluate_writes_win_rates_and_is_antisymmetric(monkeypatch, tmp_path, files, tiny_model_dir,
                                                       second_model_dir):
    """Seeded sampling is deterministic per model, so swapping model and baseline must give
    win(a, b) = 100 - win(b, a) for the raw and the LC win rate, under both judges. (Sampling,
    because the tiny random model's greedy answer is an empty string on every prompt.)"""
    prompts, judge = files
    results = []
    for a, b, name in ((tiny_model_dir, second_model_dir, "ab"), (second_model_dir, tiny_model_dir, "ba")):
        out = tmp_path / name / "result.json"
        run_cli(monkeypatch, "evaluate", "--model", str(a), "--baseline", str(b), "--prompts", str(prompts),
                "--judge", str(judge), "--out", str(out), "--max-new-tokens", "8",
                "--sample", "--temperature", "1.0", "--seed", "3")
        results.append(json.loads(out.read_text()))
        answers = [json.loads(line) for line in (out.parent / "model_answers.jsonl").read_text().splitlines()]
        assert [a["id"] for a in answers] == [p["id"] for p in PROMPTS]
        assert all(a["reward"] == a["quality"] for a in answers)  # a production judge has no length bonus
    ab, ba = results
    assert ab["model_summary"]["n_prompts"] == len(PROMPTS)
    assert 0 < ab["vs_baseline_quality"]["win_rate"] < 100  # a real contest, not all wins or all losses
    for key in ("vs_baseline", "vs_baseline_quality"):
        assert ab[key]["n"] == len(PROMPTS)
        assert ab[key]["win_rate"] == pytest.approx(100 - ba[key]["win_rate"])
        assert ab[key]["lc_win_rate"] == pytest.approx(100 - ba[key]["lc_win_rate"], abs=1e-3)


def test_evaluate_model_against_itself_is_fifty(monkeypatch, tmp_path, files, tiny_model_dir):
    prompts, judge = files
    out = tmp_path / "self.json"
    run_cli(monkeypatch, "evaluate", "--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir),
            "--prompts", str(prompts), "--judge", str(judge), "--out", str(out), "--max-new-tokens", "8")
    result = json.loads(out.read_text())
    assert result["judge"]["name"].endswith("judge.py:score")
    assert result["vs_baseline"]["win_rate"] == 50.0
    assert result["vs_baseline"]["lc_win_rate"] == pytest.approx(50.0)
    assert result["vs_baseline"]["ties"] == len(PROMPTS)


def test_evaluate_bad_judge_key_exits_2(monkeypatch, tmp_path, files, tiny_model_dir, capsys):
    prompts, _ = files
    judge = tmp_path / "bad.yaml"
    judge.write_text("type: python\nfunktion: x.py:f\n")
    assert call_main(monkeypatch, ["evaluate", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                   "--judge", str(judge)]) == 2
    assert "funktion" in capsys.readouterr().err

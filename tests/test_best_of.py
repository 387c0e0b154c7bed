"""`ilrdpo generate` and best-of-N reranking (ilrdpo.generation.best_of; smoke tier)."""

from __future__ import annotations

import json

import pytest

from helpers import read_jsonl
from ilrdpo.config import GenerationSettings, ScoringSettings
from ilrdpo.errors import UserInputError
from ilrdpo.generation.best_of import Rerank, choose, generate_file

PREFERS_12_CHARS = """
def score(prompts, completions, **kwargs):
    # the best answer is 12 characters long; every character away costs one point
    return [-abs(len(c) - 12) + 0.001 * len(set(c)) for c in completions]
"""


def candidates(*specs):
    return [{"text": "x" * chars, "score": score, "n_tokens": tokens} for score, tokens, chars in specs]


@pytest.mark.parametrize("rerank,target,expected", [
    (Rerank(), None, 1),                                  # the score alone
    (Rerank(length_weight=1.0), 10, 0),                   # 0.5 - |10 - 10| beats 0.9 - |30 - 10|
    (Rerank(length_weight=0.001), 10, 1),                 # a weak length term keeps the best score
    (Rerank(length_unit="chars", length_weight=1.0), 3, 2),  # in characters: 3 chars is exact
])
def test_choose_by_hand(rerank, target, expected):
    cands = candidates((0.5, 10, 40), (0.9, 30, 100), (0.1, 20, 3))
    assert choose(cands, target, rerank) == expected


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "Summarise: the cat sat on the mat all day.", "id": "a"},
        {"prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "How are you?"}], "id": "b", "target_length": 3},
    ]))
    return path


def scorer_settings(tmp_path) -> ScoringSettings:
    (tmp_path / "s.py").write_text(PREFERS_12_CHARS)
    return ScoringSettings(type="python", function=f"{tmp_path / 's.py'}:score")


def test_best_of_keeps_the_highest_adjusted_score(tiny_model_dir, tmp_path, prompt_file):
    out = tmp_path / "out.jsonl"
    rerank = Rerank(target_length=6, length_unit="tokens", length_weight=0.5)
    generate_file(str(tiny_model_dir), str(prompt_file), out, num_samples=5, scorer=scorer_settings(tmp_path),
                  best_of=True, rerank=rerank, generation=GenerationSettings(max_new_tokens=10, temperature=1.0))
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["a", "b"]
    for row, target in zip(rows, (6, 3)):  # prompt b's own target_length wins over --target-length
        cands = row["candidates"]
        assert len(cands) == 5
        for c in cands:  # the scorer's own score, untouched by the length term
            assert c["score"] == pytest.approx(-abs(len(c["text"]) - 12) + 0.001 * len(set(c["text"])))
        adjusted = [c["score"] - 0.5 * abs(c["n_tokens"] - target) for c in cands]
        assert row["response"] == cands[row["kept"]]["text"]
        assert adjusted[row["kept"]] == max(adjusted)


def test_without_best_of_the_first_sample_is_kept(tiny_model_dir, tmp_path, prompt_file):
    rows = generate_file(str(tiny_model_dir), str(prompt_file), tmp_path / "o.jsonl", num_samples=2,
                         generation=GenerationSettings(max_new_tokens=4, temperature=1.0))
    assert all(r["kept"] == 0 and r["candidates"][0]["score"] is None for r in rows)


def test_best_of_without_a_scorer_is_one_line(tiny_model_dir, tmp_path, prompt_file):
    with pytest.raises(UserInputError, match="'--best-of': needs --scorer"):
        generate_file(str(tiny_model_dir), str(prompt_file), tmp_path / "o.jsonl", best_of=True)


def test_a_lora_folder_generates(tiny_model_dir, tmp_path, prompt_file):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    folder = tmp_path / "lora"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    rows = generate_file(str(folder), str(prompt_file), tmp_path / "o.jsonl", num_samples=2,
                         scorer=scorer_settings(tmp_path), best_of=True,
                         generation=GenerationSettings(max_new_tokens=4, temperature=1.0))
    assert len(rows) == 2 and all(len(r["candidates"]) == 2 for r in rows)


def test_generate_command(tiny_model_dir, tmp_path, prompt_file, monkeypatch):
    """The CLI: scorer.yaml holds scoring-section keys; the output is the documented JSONL."""
    import sys

    from ilrdpo import cli

    scorer_yaml = tmp_path / "scorer.yaml"
    scorer_yaml.write_text(f"type: python\nfunction: {tmp_path / 's.py'}:score\n")
    (tmp_path / "s.py").write_text(PREFERS_12_CHARS)
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(sys, "argv", ["ilrdpo", "generate", "--model", str(tiny_model_dir), "--prompts",
                                      str(prompt_file), "--best-of", "3", "--scorer", str(scorer_yaml),
                                      "--target-length", "5", "--length-unit", "chars", "--max-new-tokens", "6",
                                      "--out", str(out)])
    cli.main()
    rows = read_jsonl(out)
    assert {"id", "prompt", "response", "kept", "candidates"} <= rows[0].keys()
    assert {"text", "score", "n_tokens", "n_chars", "truncated"} <= rows[0]["candidates"][0].keys()


RECIPES = [("summarize.jsonl", "summarize-scorer.yaml", "4", "25"), ("dialogue.jsonl", "dialogue-scorer.yaml", "5", "30")]


@pytest.mark.slow  # the bundled SmolLM2-135M and MiniLM: about a minute each on 2 CPU cores
@pytest.mark.parametrize("prompts,scorer,n,target", RECIPES, ids=["summaries", "dialogue"])
def test_recipe_runs_offline_on_the_bundled_models(tmp_path, monkeypatch, capsys, prompts, scorer, n, target):
    import sys
    from pathlib import Path

    from ilrdpo import cli

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(sys, "argv", ["ilrdpo", "generate", "--model", "bundled:smollm2-135m-instruct",
                                      "--prompts", str(root / "examples" / prompts), "--best-of", n,
                                      "--scorer", str(root / "configs" / scorer), "--target-length", target,
                                      "--length-weight", "0.01", "--max-new-tokens", "48", "--out", str(out)])
    cli.main()
    rows = read_jsonl(out)
    assert rows and all(len(r["candidates"]) == int(n) and r["response"].strip() for r in rows)
    assert all(-1.0 <= c["score"] <= 1.0 for r in rows for c in r["candidates"])
    if prompts == "summarize.jsonl":
        assert "ROUGE-L" in capsys.readouterr().err

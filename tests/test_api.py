"""The Python API (smoke tier): the notebook-style example runs unchanged on the tiny model, TRL
names and reward functions included; configs as dicts; data as Python objects."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest

import ilrdpo
from helpers import read_jsonl
from ilrdpo.errors import UserInputError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"


def test_notebook_example_runs_unchanged(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ILRDPO_EXAMPLE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("ILRDPO_EXAMPLE_OUT", str(tmp_path))
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    config = ilrdpo.make_config(tmp_path / "offline" / "config.yaml")
    # TRL's names landed on the project's keys
    assert (config.loss.beta, config.train.batch_size, config.train.epochs, config.train.report_to) == (0.1, 2, 1, [])
    assert config.loss.alpha == 0.01 and (tmp_path / "offline" / "model" / "model.safetensors").is_file()
    assert len(read_jsonl(tmp_path / "offline" / "inputs" / "pairs.jsonl")) == 3
    state = json.loads((tmp_path / "loop" / "state.json").read_text())
    assert state["finished"]["1"][-1] == "eval"


def test_reward_function_gets_text_prompts_and_columns(tiny_model_dir, tmp_path):
    """TRL's signature: prompts as text (or messages), completions as text, columns as keywords."""
    seen = {}

    def reward(prompts, completions, id, reference):
        seen.setdefault("prompts", []).extend(prompts)
        seen.setdefault("ids", []).extend(id)
        seen.setdefault("references", []).extend(reference)
        return [float(len(c)) for c in completions]

    prompts = [{"prompt": "Say hi.", "id": "a", "reference": "Hi."},
               {"prompt": [{"role": "user", "content": "Say bye."}], "id": "b", "reference": "Bye."}]
    ilrdpo.run({"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"}, "output_dir": str(tmp_path)},
               prompts=prompts, scorer=reward, iterations={"count": 1}, pairing={"skip_truncated": False},
               generation={"num_samples": 2, "max_new_tokens": 4, "temperature": 1.0}, train={"max_length": 64})
    assert "Say hi." in seen["prompts"] and [{"role": "user", "content": "Say bye."}] in seen["prompts"]
    assert set(seen["ids"]) == {"a", "b"} and set(seen["references"]) == {"Hi.", "Bye."}


def test_python_data_is_checked_like_a_file(tmp_path):
    with pytest.raises(UserInputError, match=r"pairs.jsonl: row 1: missing field 'rejected'"):
        ilrdpo.train_pairs({"output_dir": str(tmp_path)}, pairs=[{"prompt": "p", "chosen": "a", "rejected": "b"},
                                                           {"prompt": "p", "chosen": "a"}])
    assert not (tmp_path / "inputs").exists()


def test_trl_alias_and_project_key_disagreeing_is_one_line():
    with pytest.raises(UserInputError, match="'beta' .* and 'loss.beta' are both set"):
        ilrdpo.make_config({"beta": 0.2, "loss": {"beta": 0.1}})
    assert os.environ.get("ILRDPO_EXAMPLE_MODEL") is None

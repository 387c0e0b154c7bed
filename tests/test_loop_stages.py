"""The loop's stages (smoke tier, tiny Llama): alpha decided when training starts, input-file
hashes, overlap of eval and training prompts, empty answers, base targets, and the keys each
stage reads against resume.STAGE_SECTIONS.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SCORER, crash_after, read_jsonl, short_pairs
from ilrdpo.config import build_config
from ilrdpo.errors import UserInputError
from ilrdpo.loop import IterativeRun, run_iterations
from ilrdpo.resume import NEUTRAL_KEYS, stage_dependencies
from ilrdpo.rundir import STAGES
from ilrdpo.tracking import RunTracker

pytestmark = pytest.mark.smoke

PAIRS = short_pairs()


# --- the loop: alpha, input hashes, empty answers ------------------------------------------------------

TRAIN_PROMPTS = ["What is the capital of France?", "Name a colour.", "What do bees make?", "Say hello."]


def loop_config(tiny_model_dir, tmp_path, out: Path, **changes):
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": p, "id": f"t{i}"}) + "\n" for i, p in enumerate(TRAIN_PROMPTS)))
    raw = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"}, "data": {"prompts": str(prompts)},
           "generation": {"num_samples": 3, "max_new_tokens": 6, "temperature": 1.0, "batch_size": 6},
           "scoring": {"type": "python", "function": f"{SCORER}:char_count"},
           "pairing": {"skip_truncated": False},
           "train": {"batch_size": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0, "max_length": 96},
           "iterations": {"count": 1}, "output_dir": str(out)}
    for key, value in changes.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return build_config(raw)


def test_until_stops_after_that_stage_and_a_later_run_goes_on(tiny_model_dir, tmp_path):
    """run_iterations(until=(1, "pair")) (the demo's shared first steps) leaves iteration 1 with
    samples, scores and pairs and no training; a plain run afterwards trains from there."""
    out = tmp_path / "run"
    run_iterations(loop_config(tiny_model_dir, tmp_path, out), until=(1, "pair"))
    state = json.loads((out / "state.json").read_text())
    assert state["finished"]["1"] == ["generate", "score", "pair"]
    assert not (out / "iter_1" / "model").exists()
    pairs = (out / "iter_1" / "pairs.jsonl").read_text()
    run_iterations(loop_config(tiny_model_dir, tmp_path, out))
    assert json.loads((out / "state.json").read_text())["finished"]["1"] == ["generate", "score", "pair", "train", "eval"]
    assert (out / "iter_1" / "model").is_dir() and (out / "iter_1" / "pairs.jsonl").read_text() == pairs


def test_alpha_changed_before_the_train_stage_is_used(tiny_model_dir, tmp_path, monkeypatch):
    """Stopped in the score stage with alpha 0, resumed with alpha 0.5: no --force needed (train
    had not started), and training, state.json and the model card all use 0.5."""
    out = tmp_path / "run"
    crash_after(monkeypatch, "scores.partial.jsonl:1", lambda: (
        run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=0.0))))
    run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=0.5))
    assert json.loads((out / "state.json").read_text())["alpha"] == {"1": 0.5}
    card = json.loads((out / "iter_1" / "model" / "ilrdpo.json").read_text())
    assert card["hyperparameters"]["loss.alpha"] == 0.5 and "alpha=0.5" in card["method"]
    for m in read_jsonl(out / "iter_1" / "metrics.jsonl"):
        gap = m["length/chosen"] - m["length/rejected"]
        assert m["length/margin_term"] == pytest.approx(0.5 * gap, abs=1e-5)


def test_alpha_changed_after_training_started_needs_force_and_then_holds(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    crash_after(monkeypatch, "metrics.partial.jsonl:1", lambda: (
        run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=0.0))))
    with pytest.raises(UserInputError, match=r"config key 'loss.alpha' changed \(0.0 -> 0.5\); stage 'train'"):
        run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=0.5))
    run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=0.5, iterations__count=2), force=True)
    assert json.loads((out / "state.json").read_text())["alpha"] == {"1": 0.5, "2": 0.5}


def test_edited_prompts_file_is_refused_on_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = loop_config(tiny_model_dir, tmp_path, out)
    run_iterations(config)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(prompts.read_text().replace("Name a colour.", "Name a metal."))  # same ids
    with pytest.raises(UserInputError, match="the file named by 'data.prompts' changed .*iteration 1 already ran"):
        run_iterations(config)
    run_iterations(config, force=True)


def test_eval_prompts_among_training_prompts_are_counted(tiny_model_dir, tmp_path, capfd):
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": "Say hello."}) + "\n" + json.dumps({"prompt": "Name a planet."}) + "\n")
    run_iterations(loop_config(tiny_model_dir, tmp_path, tmp_path / "run", data__eval_prompts=str(evals)))
    assert "1 of 2 eval prompts are also training prompts" in capfd.readouterr().err


def eager_eos_model(tiny_model_dir, eos_weight: float):
    """The tiny Llama, untied, with one residual dimension held at 1 (set in every embedding, written
    by no layer) that only the EOS row of the head reads: EOS gets a fixed logit bonus."""
    from transformers import AutoModelForCausalLM

    tied = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = tied.config
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(tied.model.embed_tokens.weight)
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[config.eos_token_id, 0] = eos_weight
    return model


def test_a_model_that_often_answers_empty_runs_the_whole_loop(tiny_model_dir, tokenizer, tmp_path):
    """About half the sampled answers are empty (EOS first): they are never paired, the train
    stage accepts every pairs file the loop writes, and two iterations finish."""
    folder = tmp_path / "eager_eos"
    eager_eos_model(tiny_model_dir, eos_weight=1.4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    run_iterations(loop_config(tiny_model_dir, tmp_path, out, model__name_or_path=str(folder),
                               iterations__count=2, generation__num_samples=4))
    empty = [not r.strip() for k in (1, 2) for row in read_jsonl(out / f"iter_{k}" / "candidates.jsonl")
             for r in row["responses"]]
    assert 0.2 < sum(empty) / len(empty) < 0.9, sum(empty) / len(empty)
    for k in (1, 2):
        pairs = read_jsonl(out / f"iter_{k}" / "pairs.jsonl")
        assert pairs and all(p["chosen"].strip() and p["rejected"].strip() for p in pairs)
    assert json.loads((out / "state.json").read_text())["finished"]["2"][-1] == "eval"


def test_neutral_alpha_is_recorded_from_the_rounds_pairs(tiny_model_dir, tmp_path):
    """experimental.alpha_neutral (IPO): the per-unit alpha used is alpha x 1/2 x sum(g) / sum(g^2) over the round's
    signed gaps g = |y_w| - |y_l| (floored at 0), the setting kept beside it. In characters: most of
    the tiny model's answers run into max_new_tokens, so their token gaps are 0, while the
    char_count scorer makes every chosen answer the longer one in characters."""
    out = tmp_path / "run"
    run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__type="ipo", loss__alpha=1.5,
                               experimental__alpha_neutral=True, loss__length_unit="chars", generation__num_samples=4))

    pairs = read_jsonl(out / "iter_1" / "pairs.jsonl")
    gaps = np.array([len(p["chosen"]) - len(p["rejected"]) for p in pairs], float)
    state = json.loads((out / "state.json").read_text())
    assert state["alpha_setting"] == {"1": 1.5}
    expected = 1.5 * max(0.0, 0.5 * gaps.sum() / (gaps ** 2).sum()) if (gaps ** 2).sum() else 0.0
    assert state["alpha"]["1"] == pytest.approx(expected)
    assert expected > 0  # the non-zero case is exercised


def test_base_targets(tiny_model_dir, tmp_path):
    """target_length 'base': each pair carries its prompt's mean initial answer length as target;
    every metrics line reports the share of pairs the length term saturates."""
    out = tmp_path / "run"
    run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=1.0,
                               loss__target_length="base", generation__num_samples=4))
    pairs = read_jsonl(out / "iter_1" / "pairs.jsonl")
    candidates = {json.dumps(c["prompt"]): c for c in read_jsonl(out / "iter_1" / "candidates.jsonl")}
    for pair in pairs:
        c = candidates[json.dumps(pair["prompt"])]
        answers = [(n, cut) for n, r, cut in zip(c["n_tokens"], c["responses"], c["truncated"]) if r.strip()]
        kept = [n for n, cut in answers if not cut] or [n for n, _ in answers]
        assert pair["target_length"] == round(sum(kept) / len(kept))
    state = json.loads((out / "state.json").read_text())
    assert state["alpha_setting"] == state["alpha"] == {"1": 1.0}
    for m in read_jsonl(out / "iter_1" / "metrics.jsonl"):
        assert 0.0 <= m["length/saturated_share"] <= 1.0
        assert m["length/reversed_share"] == 0.0  # DPO has no target margin to reverse


# --- the keys each stage reads ----------------------------------------------------------------------


class ReadRecorder:
    """Stands in for a Config (or one of its sections) and notes every key the code reads: a
    setting read as an attribute, a whole section where the code dumps it. model_copy gives a
    recorder of the copy, so reads through copies count too."""

    def __init__(self, target, path: str, log: set[str]) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name: str):
        from pydantic import BaseModel

        value = getattr(self._target, name)
        if isinstance(value, BaseModel):
            return ReadRecorder(value, f"{self._path}{name}.", self._log)
        if name == "model_copy":
            return lambda *args, **kwargs: ReadRecorder(value(*args, **kwargs), self._path, self._log)
        if name.startswith("model_") and callable(value):  # model_dump and the like: the whole section
            self._log.add(self._path.rstrip(".") or "<all>")
            return value
        self._log.add(f"{self._path}{name}")
        return value


def test_every_key_a_stage_reads_is_in_its_stage_sections(tiny_model_dir, tmp_path):
    """Each stage of iterations 0 and 1 runs with a config that records what it reads; every key
    read must be one of the stage's dependencies (resume.stage_dependencies, from STAGE_SECTIONS),
    or changing it under finished work would not be refused on resume. (loss.target_length, read
    by pairing with 'base', and loss.length_unit, read by the evaluation's length summary, were
    missing once.)"""
    eval_prompts = tmp_path / "eval.jsonl"
    eval_prompts.write_text("".join(json.dumps({"prompt": p, "id": f"e{i}"}) + "\n" for i, p in enumerate(
        ["Name a fruit.", "What is two plus two?"])))
    config = loop_config(tiny_model_dir, tmp_path, tmp_path / "run", data__eval_prompts=str(eval_prompts),
                         loss__target_length="base", loss__alpha=0.01)
    run = IterativeRun(config)
    with run.dir.locked("test"):
        run.open()
        run.tracker = RunTracker([], run.dir.root, {})
        reads: dict[tuple[int, str], set[str]] = {}
        for t, name in [(0, "eval"), *((1, name) for name in STAGES)]:
            reads[t, name] = set()
            run.config = ReadRecorder(config, "", reads[t, name])
            run.run_stage(t, name)
        run.config = config
    unlisted = {(t, name): sorted(key for key in keys if key not in NEUTRAL_KEYS and not any(
                key == d or key.startswith(d + ".") for d in stage_dependencies(t, name)))
                for (t, name), keys in reads.items()}
    assert "generation.temperature" in reads[1, "generate"] and "loss.alpha" in reads[1, "train"]
    assert not any(unlisted.values()), {k: v for k, v in unlisted.items() if v}

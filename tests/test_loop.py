"""The iterative loop (ilrdpo.loop): run directory, reference model, resume, config checks, alpha
control, and recovery from SIGKILL.

Smoke tier: every run is two iterations of the tiny Llama with a python scorer (longer text
scores higher), 8 training prompts x 2 samples of 8 tokens, and 2 eval prompts. One
uninterrupted run (the module fixture `base_run`) is the yardstick: the killed-and-resumed runs
must reproduce its files byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import DESIGN_METRICS, console_script, first_lines, read_jsonl, shared_folder
from ilrdpo.alpha import neutral_alpha, next_alpha
from ilrdpo.config import build_config, load_config
from ilrdpo.data import collate_pairs, tokenize_pairs
from ilrdpo.errors import UserInputError
from ilrdpo.logprobs import sequence_logps
from ilrdpo.loop import run_iterations
from ilrdpo.records import read_pairs
from ilrdpo.resume import check_resume
from ilrdpo.rundir import STAGES, RunDir

TESTS = Path(__file__).resolve().parent
SCORER = TESTS / "helpers" / "scorer.py"

TRAIN_PROMPTS = ["What is the capital of France?", "Name a colour.", "What do bees make?",
                 "How many legs does a spider have?", "Why is the sky blue?", "Say hello.",
                 "What is 2 + 2?", "Which animal says moo?"]
EVAL_PROMPTS = ["What is ice?", "Name a planet."]
MAX_NEW_TOKENS = 8
EPOCHS = 2  # 4 steps per epoch: training lasts long enough to be killed in the middle


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    """The prompt files, one pair for the session: the shared runs below name them in their
    configs, so every xdist worker must see the same paths."""
    def build(folder: Path) -> None:
        for name, texts, prefix in (("prompts.jsonl", TRAIN_PROMPTS, "t"), ("eval.jsonl", EVAL_PROMPTS, "e")):
            (folder / name).write_text("".join(json.dumps({"prompt": p, "id": f"{prefix}{i}"}) + "\n"
                                               for i, p in enumerate(texts)))

    folder = shared_folder(tmp_path_factory, "loop_prompts", build)
    return folder / "prompts.jsonl", folder / "eval.jsonl"


@pytest.fixture(scope="module")
def raw_config(tiny_model_dir, prompt_files):
    """raw_config(output_dir) -> the YAML-level dict of a small two-iteration run."""
    train, evaluation = prompt_files

    def make(output_dir: Path) -> dict:
        return {
            "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
            "data": {"prompts": str(train), "eval_prompts": str(evaluation)},
            # 2 samples per batch of 2 rows: one prompt per batch, 8 batches per iteration
            "generation": {"num_samples": 2, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "batch_size": 2},
            "scoring": {"type": "python", "function": f"{SCORER}:char_count"},
            "pairing": {"skip_truncated": False},  # a random tiny model rarely stops before 8 tokens
            "train": {"batch_size": 2, "learning_rate": 1e-3, "epochs": EPOCHS, "warmup_ratio": 0.0,
                      "max_length": 128},
            "iterations": {"count": 2},
            "output_dir": str(output_dir),
            "seed": 0,
        }

    return make


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, raw_config):
    """(run dir, config, summaries) of one uninterrupted two-iteration run, built once per session
    for every worker. Read-only: a test that runs the loop on it works on copy_run(...)."""
    def build(folder: Path) -> None:
        summaries = run_iterations(build_config(raw_config(folder / "run")))
        (folder / "summaries.json").write_text(json.dumps(summaries))

    folder = shared_folder(tmp_path_factory, "loop_base_run", build)
    out = folder / "run"
    return out, build_config(raw_config(out)), json.loads((folder / "summaries.json").read_text())


def mtimes(out: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and str(p.relative_to(out)) not in skip}


def one_by_one_logps(model, tokenizer, pairs) -> list[list[float]]:
    """[chosen, rejected] summed answer log-probs, one unpadded pair at a time."""
    rows = []
    for example in tokenize_pairs(tokenizer, pairs, max_length=128):
        batch = collate_pairs([example], tokenizer.pad_token_id)
        with torch.no_grad():
            logps, _ = sequence_logps(model.eval(), batch["input_ids"], batch["attention_mask"],
                                      batch["response_mask"])
        rows.append(logps.tolist())
    return rows


def close(actual, expected) -> None:
    """Equal up to batching round-off (ilrdpo scores pairs in padded batches, the tests one by one)."""
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), atol=1e-4, rtol=0)


def load_causal_lm(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# --- an uninterrupted run -----------------------------------------------------------------------


def test_two_iterations_write_the_documented_run_directory(base_run, raw_config):
    out, config, summaries = base_run
    for name in ["config.yaml", "state.json", "iter_0/eval.json", "iter_0/eval_answers.jsonl"]:
        assert (out / name).is_file(), name
    for k in (1, 2):
        for name in ["candidates.jsonl", "pairs.jsonl", "metrics.jsonl", "eval.json", "eval_answers.jsonl",
                     "ref_logps.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json"]:
            assert (out / f"iter_{k}" / name).is_file(), f"iter_{k}/{name}"
    assert not (out / "iter_3").exists()
    assert not list(out.rglob("*.partial.jsonl")) and not list(out.rglob("*.tmp"))
    assert load_config(out / "config.yaml") == config
    finished = json.loads((out / "state.json").read_text())["finished"]
    assert (finished["1"], finished["2"]) == (STAGES, STAGES) and "3" not in finished
    assert [s["iteration"] for s in summaries] == [0, 1, 2]
    for k in (0, 1, 2):
        assert json.loads((out / f"iter_{k}" / "eval.json").read_text())["iteration"] == k


def test_candidates_hold_every_answer_with_its_reward(base_run):
    """One line per prompt, in file order; the reward of each answer is the scorer's value for
    that very text (char_count: its length); n_tokens counts the tokens generated for each answer."""
    out, _, _ = base_run
    for k in (1, 2):
        rows = read_jsonl(out / f"iter_{k}" / "candidates.jsonl")
        assert [r["id"] for r in rows] == [f"t{i}" for i in range(len(TRAIN_PROMPTS))]
        assert [r["prompt"] for r in rows] == TRAIN_PROMPTS
        for row in rows:
            lists = [row[key] for key in ("responses", "n_tokens", "truncated", "rewards", "quality")]
            assert all(len(values) == 2 for values in lists), row
            assert row["rewards"] == row["quality"] == [float(len(r)) for r in row["responses"]]
            # |y| of a sampled answer: the tokens generated (all 8 where cut by max_new_tokens)
            assert all(n <= MAX_NEW_TOKENS for n in row["n_tokens"])
            assert [n == MAX_NEW_TOKENS for n in row["n_tokens"]] == row["truncated"]


def test_pairs_are_best_against_worst_of_each_prompt(base_run):
    out, _, _ = base_run
    for k in (1, 2):
        expected = []
        for row in read_jsonl(out / f"iter_{k}" / "candidates.jsonl"):
            (r0, r1), (a0, a1) = row["rewards"], row["responses"]
            if r0 != r1 and a0 != a1:
                (best, best_r), (worst, worst_r) = sorted([(a0, r0), (a1, r1)], key=lambda x: -x[1])
                expected.append({"prompt": row["prompt"], "chosen": best, "rejected": worst,
                                 "chosen_reward": best_r, "rejected_reward": worst_r, "margin": best_r - worst_r})
        pairs = read_jsonl(out / f"iter_{k}" / "pairs.jsonl")
        assert len(pairs) >= 4
        assert [{key: p[key] for key in expected[0]} for p in pairs] == expected


def test_metrics_and_reference_logps_per_iteration(base_run):
    out, _, _ = base_run
    for k in (1, 2):
        n_pairs = len(read_jsonl(out / f"iter_{k}" / "pairs.jsonl"))
        metrics = read_jsonl(out / f"iter_{k}" / "metrics.jsonl")
        assert len(metrics) == math.ceil(EPOCHS * math.ceil(n_pairs / 2))
        assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
        assert DESIGN_METRICS <= set(metrics[0])
        ref = json.loads((out / f"iter_{k}" / "ref_logps.json").read_text())
        assert len(ref) == n_pairs and all(len(r) == 2 and r[0] < 0 and r[1] < 0 for r in ref)


def test_reference_of_each_iteration_is_the_previous_model(base_run, tiny_model_dir, tokenizer):
    """iter_2/ref_logps.json are the log-probs of iteration 2's pairs under iter_1/model (pi_1),
    not under the initial model; iter_1's are those of its pairs under the initial model."""
    out, _, _ = base_run
    initial, first = load_causal_lm(tiny_model_dir), load_causal_lm(out / "iter_1" / "model")
    pairs_1, pairs_2 = read_pairs(out / "iter_1" / "pairs.jsonl"), read_pairs(out / "iter_2" / "pairs.jsonl")
    ref_1 = json.loads((out / "iter_1" / "ref_logps.json").read_text())
    ref_2 = json.loads((out / "iter_2" / "ref_logps.json").read_text())

    close(ref_1, one_by_one_logps(initial, tokenizer, pairs_1))
    under_pi_1 = torch.tensor(one_by_one_logps(first, tokenizer, pairs_2))
    under_pi_0 = torch.tensor(one_by_one_logps(initial, tokenizer, pairs_2))
    close(ref_2, under_pi_1)
    assert (under_pi_1 - under_pi_0).abs().max() > 1e-2  # training moved pi_1: the check tells them apart


# --- resume and config checks -------------------------------------------------------------------


def copy_run(out: Path, tmp_path: Path) -> Path:
    """A copy of a finished run that is the same run in another folder (its config.yaml names the
    new output_dir), so that a test may run the loop on it."""
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    saved = copy / "config.yaml"
    saved.write_text(saved.read_text().replace(str(out), str(copy)))
    return copy


# Rewritten on every start by design: the resolved config and the stage timings.
REWRITTEN = ("config.yaml", "timings.json", "lock")


def test_a_finished_run_leaves_no_lock_file(base_run):
    assert not (base_run[0] / "lock").exists()


def test_rerun_of_a_finished_run_redoes_nothing(base_run, raw_config, tmp_path):
    """iter_0/eval.json is left out here: see the next test."""
    _, _, summaries = base_run
    out = copy_run(base_run[0], tmp_path)
    config = build_config(raw_config(out))
    before = mtimes(out, REWRITTEN + ("iter_0/eval.json",))
    start = time.perf_counter()
    again = run_iterations(config)
    elapsed = time.perf_counter() - start
    assert mtimes(out, REWRITTEN + ("iter_0/eval.json",)) == before
    assert again == json.loads(json.dumps(summaries))
    assert elapsed < 10, f"a finished run took {elapsed:.1f} s to resume"


def test_rerun_keeps_the_initial_models_evaluation(base_run, raw_config, tmp_path):
    out = copy_run(base_run[0], tmp_path)
    config = build_config(raw_config(out))
    before = (out / "iter_0" / "eval.json").stat().st_mtime_ns
    run_iterations(config)
    assert (out / "iter_0" / "eval.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("override,key", [
    ("generation.temperature=0.5", "generation.temperature"),
    ("scoring.tie_tolerance=0.1", "scoring.tie_tolerance"),
    ("pairing.strategy=all", "pairing.strategy"),
    ("loss.beta=0.2", "loss.beta"),
    ("experimental.eval_samples=1", "experimental.eval_samples"),
    ("seed=1", "seed"),
])
def test_config_change_under_finished_work_is_refused(base_run, raw_config, override, key, tmp_path):
    out = copy_run(base_run[0], tmp_path)
    saved_config, saved_state = (out / "config.yaml").read_text(), (out / "state.json").read_text()
    with pytest.raises(UserInputError, match=f"config key '{key}' changed"):
        run_iterations(build_config(raw_config(out), [override]))
    assert (out / "config.yaml").read_text() == saved_config
    assert (out / "state.json").read_text() == saved_state


def test_force_accepts_a_changed_config_without_redoing_work(base_run, raw_config, tmp_path):
    copy = copy_run(base_run[0], tmp_path)
    before = mtimes(copy, REWRITTEN + ("iter_0/eval.json", "state.json"))
    run_iterations(build_config(raw_config(copy), ["loss.beta=0.2"]), force=True)
    assert load_config(copy / "config.yaml").loss.beta == 0.2
    # the config the finished iterations ran with is kept, never overwritten
    assert load_config(copy / "config_history" / "001.yaml").loss.beta == 0.1
    assert mtimes(copy, REWRITTEN + ("iter_0/eval.json", "config_history/001.yaml", "state.json")) == before


def test_more_iterations_continue_a_finished_run(base_run, raw_config, tmp_path):
    """iterations.count 2 -> 3 touches no finished stage (and a copied run dir changes only
    output_dir): iteration 3 runs, iterations 1 and 2 are left as they were, but for iteration 1's
    model, which iterations.keep_models (2 by default) removes once iteration 3 stands."""
    copy = copy_run(base_run[0], tmp_path)
    before = {k: v for k, v in mtimes(copy).items() if k.startswith(("iter_1/", "iter_2/"))}
    summaries = run_iterations(build_config(raw_config(copy), ["iterations.count=3"]))
    assert [s["iteration"] for s in summaries] == [0, 1, 2, 3]
    assert not (copy / "iter_1" / "model").exists() and (copy / "iter_2" / "model" / "model.safetensors").is_file()
    kept = {k: v for k, v in before.items() if not k.startswith("iter_1/model/")}
    assert {k: v for k, v in mtimes(copy).items() if k.startswith(("iter_1/", "iter_2/"))} == kept
    assert json.loads((copy / "state.json").read_text())["finished"]["3"] == STAGES
    assert (copy / "iter_3" / "model" / "model.safetensors").is_file()


def finished_through(stages_by_iteration: dict[int, int]) -> dict[int, list[str]]:
    """{iteration: number of finished stages} -> state.json's finished lists."""
    return {t: STAGES[:n] for t, n in stages_by_iteration.items()}


@pytest.mark.parametrize("override,finished,refused", [
    # iteration 1 generated only: sampling settings are fixed, later stages' are not
    ("generation.top_p=0.9", {1: 1}, True),
    ("data.system_prompt=Be brief.", {1: 1}, True),  # generation reads it: samples made under the old value
    ("scoring.tie_tolerance=0.1", {1: 1}, False),
    ("pairing.strategy=all", {1: 2}, False),
    ("pairing.strategy=all", {1: 3}, True),
    ("loss.target_length=base", {1: 3}, True),  # pairs carry per-prompt targets with 'base'
    ("loss.length_unit=chars", {0: 0}, False),
    ("loss.length_unit=chars", {0: 5}, True),  # iteration 0's eval.json summarises lengths in this unit
    ("loss.alpha=0.1", {1: 3}, False),
    ("loss.alpha=0.1", {1: 4}, True),
    ("iterations.alpha_control.budget=1.0", {1: 4}, True),
    ("experimental.eval_samples=2", {1: 4}, False),
    ("experimental.eval_samples=2", {1: 5}, True),
    # iteration 2 was sampled from pi_1, so it depends on everything that trained pi_1
    ("train.learning_rate=0.1", {1: 5, 2: 1}, True),
    # keys no stage reads
    ("iterations.count=5", {1: 5, 2: 5}, False),
    ("output_dir=elsewhere", {1: 5, 2: 5}, False),
    ("data.pairs=pairs.jsonl", {1: 5, 2: 5}, False),
])
def test_check_resume_by_stage(override, finished, refused):
    base = {"loss": {"alpha": 0.05}}  # alpha control starts from a loss.alpha > 0
    old, new = build_config(base), build_config(base, [override])
    key = override.split("=")[0]
    if refused:
        with pytest.raises(UserInputError, match=f"'{key}' changed"):
            check_resume(old, new, finished_through(finished), force=False)
    else:
        check_resume(old, new, finished_through(finished), force=False)
    check_resume(old, new, finished_through(finished), force=True)


def test_eval_change_after_the_initial_evaluation_is_refused(raw_config, tmp_path):
    """The scorer fails on training prompts, so the run stops after iteration 1's generation with
    iteration 0's eval answers on disk. Resuming with another experimental.eval_samples must be refused;
    accepting it runs into the scorer's RuntimeError again."""
    raw = raw_config(tmp_path / "run")
    raw["scoring"]["function"] = f"{SCORER}:fails_on_training_prompts"
    with pytest.raises(UserInputError, match="scorer unavailable"):
        run_iterations(build_config(raw))
    assert (tmp_path / "run" / "iter_0" / "eval_answers.jsonl").is_file()
    assert json.loads((tmp_path / "run" / "state.json").read_text())["finished"]["1"] == ["generate"]
    with pytest.raises(UserInputError, match="experimental.eval_samples"):
        run_iterations(build_config(raw, ["experimental.eval_samples=1"]))


# --- reference = initial ------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reference_initial_is_the_initial_model(raw_config, tiny_model_dir, tokenizer, tmp_path, lora):
    """iterations.reference=initial: iteration 2's reference log-probs are those of the initial
    model (with LoRA: the adapter disabled), not of pi_1."""
    raw = raw_config(tmp_path / "run")
    raw["iterations"]["reference"] = "initial"
    raw["train"].update(epochs=1, learning_rate=1e-2 if lora else 1e-3)
    raw["data"].update(eval_prompts=None, prompts=str(first_lines(Path(raw["data"]["prompts"]), 4, tmp_path)))
    if lora:
        raw["model"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    out = tmp_path / "run"
    run_iterations(build_config(raw))

    assert (out / "iter_2" / "model" / "adapter_config.json").is_file() == lora
    initial = load_causal_lm(tiny_model_dir)
    if lora:
        from peft import PeftModel

        first = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), out / "iter_1" / "model").eval()
    else:
        first = load_causal_lm(out / "iter_1" / "model")
    pairs = read_pairs(out / "iter_2" / "pairs.jsonl")
    under_pi_0 = torch.tensor(one_by_one_logps(initial, tokenizer, pairs))
    close(json.loads((out / "iter_2" / "ref_logps.json").read_text()), under_pi_0)
    assert (torch.tensor(one_by_one_logps(first, tokenizer, pairs)) - under_pi_0).abs().max() > 1e-3


# --- alpha control ------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize(("alpha", "mean_length", "initial_length", "budget", "expected"), [
    # log-space proportional, the same both ways: 20% over / under, 0.1 * exp(+-0.5 * 0.2)
    (0.1, 12.0, 10.0, 1.0, 0.1 * math.exp(0.1)),
    (0.1, 8.0, 10.0, 1.0, 0.1 * math.exp(-0.1)),
    # |log change| at most 0.2: 100% under (0.5 x -1) gives exp(-0.2), 100% over exp(0.2)
    (0.1, 0.0, 10.0, 1.0, 0.1 * math.exp(-0.2)),
    (0.1, 20.0, 10.0, 1.0, 0.1 * math.exp(0.2)),
    # within 2%: unchanged
    (0.1, 10.15, 10.0, 1.0, 0.1),
    (0.1, 9.85, 10.0, 1.0, 0.1),
    # budget > 10 is tokens: 60 vs 50 is 20% over, whatever the initial length
    (0.1, 60.0, 1000.0, 50.0, 0.1 * math.exp(0.1)),
    # relative budget 0.5: 4.4 vs 0.5 x 8 = 4 is 10% over, exp(0.05)
    (0.04, 4.4, 8.0, 0.5, 0.04 * math.exp(0.05)),
    # at most 4 x loss.alpha (start 0.1): 0.39 x exp(0.2) is clamped to 0.4
    (0.39, 20.0, 10.0, 1.0, 0.4),
])
def test_next_alpha_by_hand(alpha, mean_length, initial_length, budget, expected):
    assert next_alpha(alpha, mean_length, initial_length, budget, start=0.1) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_neutral_alpha_leaves_the_targets_without_a_length_slope(seed):
    """Against numpy's float64 least squares: with alpha = neutral_alpha(g, T) the targets T - alpha * g
    have zero slope on g (fit through the origin); a larger alpha gives a negative slope."""
    rng = np.random.default_rng(seed)
    gaps = rng.normal(25, 30, size=64).round()
    alpha = neutral_alpha(gaps.tolist(), 0.5)
    assert alpha > 0
    slope = np.linalg.lstsq(gaps[:, None], 0.5 - alpha * gaps, rcond=None)[0][0]
    assert abs(slope) < 1e-12
    assert np.linalg.lstsq(gaps[:, None], 0.5 - 1.1 * alpha * gaps, rcond=None)[0][0] < 0


def test_neutral_alpha_is_zero_when_chosen_answers_are_shorter():
    assert neutral_alpha([-20.0, -5.0, 10.0], 0.5) == 0.0
    assert neutral_alpha([0.0, 0.0], 0.5) == 0.0
    assert neutral_alpha([10.0, 10.0], 0.5) == pytest.approx(0.05)  # T / g when every gap is g


def test_alpha_control_raises_alpha_while_answers_are_over_budget(raw_config, tmp_path):
    """budget 0.5 x the first round's mean sampled length: the tiny model's samples run to
    max_new_tokens in every round, so round 2's own samples (drawn from pi_1, before its training)
    are far over budget and alpha grows by exp(min(0.2, 0.5 x over)): 0.04 -> 0.04 x e^0.2 with
    over >= 0.4. No eval prompts: the law reads the training prompts' samples only.
    Lengths are in characters, so the logged length/margin_term = alpha * (mean chars chosen - mean
    chars rejected) shows the alpha each round actually trained with."""
    raw = raw_config(tmp_path / "run")
    raw["iterations"]["alpha_control"] = {"budget": 0.5}
    raw["loss"] = {"alpha": 0.04, "length_unit": "chars"}
    raw["train"]["epochs"] = 1
    raw["data"]["prompts"] = str(first_lines(Path(raw["data"]["prompts"]), 4, tmp_path))
    raw["data"]["eval_prompts"] = None
    out = tmp_path / "run"
    run_iterations(build_config(raw))

    lengths = [np.mean([n for row in read_jsonl(out / f"iter_{k}" / "candidates.jsonl") for n in row["n_tokens"]])
               for k in (1, 2)]
    assert lengths[1] / lengths[0] >= 0.7, lengths  # >= 40% over 0.5 x the first round's: a full step
    alpha = json.loads((out / "state.json").read_text())["alpha"]
    second = 0.04 * math.exp(0.2)
    assert alpha == pytest.approx({"1": 0.04, "2": second})  # decided when each train stage starts
    for k, used in ((1, 0.04), (2, second)):
        assert "alpha" not in json.loads((out / f"iter_{k}" / "eval.json").read_text())  # state.json's alone
        steps = [m for m in read_jsonl(out / f"iter_{k}" / "metrics.jsonl")
                 if abs(m["length/chosen"] - m["length/rejected"]) > 0.5]
        assert steps
        for m in steps:
            assert m["length/margin_term"] / (m["length/chosen"] - m["length/rejected"]) == pytest.approx(used)


@pytest.mark.unit
def test_a_config_with_alpha_control_retries_is_refused_in_one_line():
    """The retries (a round trained again when its eval length missed a band) went with the law
    that steered on the eval prompts: a config that sets them gets one line, exit status 2."""
    with pytest.raises(UserInputError, match=r"^command line: config key 'iterations.alpha_control.retries' was "
                                             r"removed; use nothing: alpha control now decides") as info:
        load_config(None, ["iterations.alpha_control.retries=2"])
    assert info.value.exit_code == 2


# --- SIGKILL and resume -------------------------------------------------------------------------
# `ilrdpo run` in a subprocess is killed with SIGKILL in the middle of a stage, then the same
# config runs again to completion; its files must equal the uninterrupted base run's.


def run_env() -> dict[str, str]:
    return {**os.environ, "ILRDPO_QUIET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def n_lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def finished_stages(out: Path) -> dict[str, list[str]]:
    path = out / "state.json"
    return json.loads(path.read_text())["finished"] if path.exists() else {}


def kill_when(command: list[str], log: Path, ready, what: str, timeout: float = 240.0) -> None:
    """Start `command`, SIGKILL it as soon as ready() is true; fail if it ends first or never gets there."""
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=run_env())
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"the run ended (status {process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def step_metrics(folder: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    rows = read_jsonl(folder / "metrics.jsonl")
    return [{key: value for key, value in row.items() if key != "elapsed_s"} for row in rows]


def resume_and_compare(config_path: Path, out: Path, base: Path) -> None:
    """Run the same config again to completion (in this process: the state is all on disk, and
    a second interpreter would only add its start-up time) and compare with the base run."""
    run_iterations(load_config(config_path))
    assert (finished_stages(out)["1"], finished_stages(out)["2"]) == (STAGES, STAGES)
    for name in ["iter_1/candidates.jsonl", "iter_1/pairs.jsonl", "iter_2/candidates.jsonl",
                 "iter_2/pairs.jsonl", "iter_2/ref_logps.json"]:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    for k in (1, 2):  # one line per step: a restarted round does not append to the killed one
        assert step_metrics(out / f"iter_{k}") == step_metrics(base / f"iter_{k}")
    assert not list(out.rglob("*.partial.jsonl"))


def write_config(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.slow  # ~20 s: a second interpreter's start-up and a whole run
def test_sigkill_during_generation_resumes_to_the_uninterrupted_result(base_run, raw_config, tmp_path):
    out = tmp_path / "run"
    config_path = write_config(raw_config(out), tmp_path / "config.yaml")
    command = console_script() + ["run", str(config_path)]
    partial = out / "iter_1" / "generation.partial.jsonl"
    kill_when(command, tmp_path / "killed.log", lambda: n_lines(partial) >= 1, "iteration 1 sampling")

    assert "generate" not in finished_stages(out).get("1", []), "killed too late: sampling had finished"
    assert 1 <= n_lines(partial) < len(TRAIN_PROMPTS) and not (out / "iter_1" / "candidates.jsonl").exists()
    resume_and_compare(config_path, out, base_run[0])


@pytest.mark.slow  # ~20 s: a second interpreter's start-up and a whole run
def test_sigkill_during_training_resumes_to_the_uninterrupted_result(base_run, raw_config, tmp_path):
    out = tmp_path / "run"
    config_path = write_config(raw_config(out), tmp_path / "config.yaml")
    command = console_script() + ["run", str(config_path)]
    metrics = out / "iter_1" / "metrics.jsonl"
    kill_when(command, tmp_path / "killed.log", lambda: n_lines(metrics) >= 1, "iteration 1 training")

    assert finished_stages(out).get("1") == ["generate", "score", "pair"], "killed outside training"
    assert not (out / "iter_1" / "model").exists()
    resume_and_compare(config_path, out, base_run[0])


# --- fault injection at every write point ---------------------------------------------------------
# ILRDPO_FAULT=FILE:K "kills" the run right after the K-th write of FILE in this process
# (ilrdpo.faults); the same config then runs again to completion and must reproduce the
# uninterrupted run's files. save_steps=2 adds mid-round checkpoints, so a round killed in training
# resumes from one. A fault in iteration 1 is injected into a one-iteration run started from
# nothing; a fault in iteration 2 into the continuation of a finished one-iteration run (a copy),
# where K counts the writes of that continuation alone. Both are compared with the uninterrupted
# two-iteration run, iteration by iteration: a round's files depend only on the files before it.

FAULTS = [
    (1, "config.yaml:1"), (1, "state.json:1"), (1, "eval_answers.jsonl:1"), (1, "generation.partial.jsonl:3"),
    (1, "candidates.jsonl:1"), (1, "scores.partial.jsonl:2"), (1, "candidates.jsonl:2"), (1, "pairs.jsonl:1"),
    (1, "metrics.partial.jsonl:3"), (1, "checkpoint:1"), (1, "metrics.jsonl:1"), (1, "ref_logps.json:1"),
    (1, "model:1"), (1, "eval.json:2"), (1, "checkpoint:3"), (1, "state.json:12"),
    (2, "candidates.jsonl:2"), (2, "metrics.partial.jsonl:3"), (2, "model:1"), (2, "state.json:3"),
]
COMPARED = ["candidates.jsonl", "pairs.jsonl", "ref_logps.json", "eval_answers.jsonl", "model/model.safetensors"]


@pytest.fixture(scope="module")
def one_iteration_run(tmp_path_factory, raw_config) -> Path:
    """A finished one-iteration run with the base run's settings (shared, read-only)."""
    def build(folder: Path) -> None:
        raw = raw_config(folder / "run")
        raw["iterations"]["count"] = 1
        run_iterations(build_config(raw))

    return shared_folder(tmp_path_factory, "loop_one_iteration", build) / "run"


@pytest.mark.slow  # ~3 s each: a killed and a resumed round
@pytest.mark.parametrize("iteration,fault", FAULTS, ids=[f"iter{k}-{f}" for k, f in FAULTS])
def test_fault_at_every_write_point_resumes_to_the_same_files(base_run, one_iteration_run, raw_config, tmp_path,
                                                              monkeypatch, iteration, fault):
    from ilrdpo import faults

    out = tmp_path / "run"
    if iteration == 2:
        shutil.copytree(one_iteration_run, out)
    raw = raw_config(out)
    raw["train"]["save_steps"] = 2
    raw["iterations"]["count"] = iteration
    config = build_config(raw)
    faults.reset()
    monkeypatch.setenv("ILRDPO_FAULT", fault)
    with pytest.raises(faults.SimulatedCrash):
        run_iterations(config)
    monkeypatch.delenv("ILRDPO_FAULT")
    run_iterations(config)

    base = base_run[0]
    for k in range(1, iteration + 1):
        for name in COMPARED:
            assert (out / f"iter_{k}" / name).read_bytes() == (base / f"iter_{k}" / name).read_bytes(), (k, name)
        assert step_metrics(out / f"iter_{k}") == step_metrics(base / f"iter_{k}")
        assert not (out / f"iter_{k}" / "checkpoint").exists()
    assert finished_stages(out) == {str(k): stages for k, stages in finished_stages(base).items()
                                    if int(k) <= iteration}
    assert (out / "iter_0" / "eval_answers.jsonl").read_bytes() == (base / "iter_0" / "eval_answers.jsonl").read_bytes()
    assert not list(out.rglob("*.partial.jsonl")) and not list(out.rglob(".*.tmp"))


def test_one_tracker_run_with_a_global_step_across_iterations(raw_config, tmp_path):
    """train.report_to=[tensorboard] in `ilrdpo run`: one event log under OUT/logs; train/ steps
    continue across iterations, eval/ figures sit where each iteration's training ended."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = raw_config(tmp_path / "run")
    raw["train"]["report_to"] = ["tensorboard"]
    run_iterations(build_config(raw))
    # one run: its scalars, and the hyperparameters TensorBoard keeps in a subfolder of it
    events = list((tmp_path / "run" / "logs" / "run").glob("events.out.tfevents.*"))
    assert len(events) == 1 and [p.name for p in (tmp_path / "run" / "logs").iterdir()] == ["run"]
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    steps = [len(read_jsonl(tmp_path / "run" / f"iter_{t}" / "metrics.jsonl")) for t in (1, 2)]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, sum(steps) + 1))
    assert [e.step for e in acc.Scalars("eval/length")] == [0, steps[0], sum(steps)]
    assert {"eval/lc_win_rate_vs_initial", "eval/quality", "train/length/saturated_share"} <= set(acc.Tags()["scalars"])


@pytest.mark.unit
def test_wandb_project_and_run_name(monkeypatch, tmp_path):
    """W&B gets the project from $WANDB_PROJECT, else 'ilrdpo' (accelerate's WandBTracker passes
    its run_name to wandb.init as the project), and the run name from $WANDB_NAME, else the output
    folder's name (`ilrdpo train`'s caller may name it)."""
    from ilrdpo.tracking import tracker_arguments

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_NAME", raising=False)
    assert tracker_arguments("wandb", tmp_path / "out") == {"run_name": "ilrdpo", "name": "out"}
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert tracker_arguments("wandb", tmp_path / "out", "r1") == {"run_name": "mine", "name": "r1"}
    monkeypatch.setenv("WANDB_NAME", "named")
    assert tracker_arguments("wandb", tmp_path / "out")["name"] == "named"
    monkeypatch.delenv("WANDB_NAME")
    assert tracker_arguments("tensorboard", tmp_path / "out") == {"run_name": "out",
                                                                  "logging_dir": tmp_path / "out" / "logs"}


def test_eval_perplexity_under_the_initial_model(raw_config, tmp_path, tiny_model_dir, tokenizer):
    """experimental.perplexity: eval.json's perplexity_initial is exp(-mean log pi_0(answer token | prompt,
    answer so far)), checked against a plain forward pass per answer (all fit the context)."""
    from transformers import AutoModelForCausalLM

    from ilrdpo.data import encode_prompt

    raw = raw_config(tmp_path / "run")
    raw["experimental"] = {"perplexity": True}
    raw["iterations"]["count"] = 1
    run_iterations(build_config(raw))
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = {row["id"]: row["prompt"] for row in read_jsonl(Path(raw["data"]["eval_prompts"]))}
    checked = 0
    for t in (0, 1):
        total, count = 0.0, 0
        for row in read_jsonl(tmp_path / "run" / f"iter_{t}" / "eval_answers.jsonl"):
            if not row["response"]:
                continue
            prompt = encode_prompt(tokenizer, prompts[row["id"]], True, None)
            answer = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logps = torch.log_softmax(initial(input_ids=ids).logits[0, :-1].double(), -1)
            total += float(logps[len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None]).sum())
            count += len(answer)
        result = json.loads((tmp_path / "run" / f"iter_{t}" / "eval.json").read_text())
        assert result["perplexity_tokens"] == count and result["perplexity_windowed"] == 0
        if count:  # the random initial model's greedy answers may decode to no text at all
            assert result["perplexity_initial"] == pytest.approx(math.exp(-total / count), rel=1e-4)
            checked += 1
    assert checked


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_sampled_eval_next_to_greedy(raw_config, tmp_path):
    """experimental.eval_samples: K sampled answers per eval prompt beside the greedy ones, summarised over all
    answers; the win rate against pi_0's sampled answers compares per-prompt means (checked by
    hand); the report gets sampled columns; a resumed run keeps the draws."""
    from ilrdpo.evaluation.report import write_report

    raw = raw_config(tmp_path / "run")
    raw["experimental"] = {"eval_samples": 3}
    run_iterations(build_config(raw))
    run = tmp_path / "run"
    rows = {t: read_jsonl(run / f"iter_{t}" / "eval_samples.jsonl") for t in (0, 1, 2)}
    for t, drawn in rows.items():
        assert [(r["id"], r["sample"]) for r in drawn] == [(f"e{i}", j) for i in range(2) for j in range(3)]
        sampled = json.loads((run / f"iter_{t}" / "eval.json").read_text())["sampled"]
        assert sampled["samples_per_prompt"] == 3 and sampled["n_prompts"] == 6
        assert sampled["quality_mean"] == pytest.approx(_mean(r["quality"] for r in drawn))
        assert sampled["length"]["tokens_mean"] == pytest.approx(_mean(r["n_tokens"] for r in drawn))
        greedy = {r["id"]: r["response"] for r in read_jsonl(run / f"iter_{t}" / "eval_answers.jsonl")}
        assert any(r["response"] != greedy[r["id"]] for r in drawn)  # sampled, not the greedy answer again

        if t:
            per_prompt = [[_mean(r["quality"] for r in rows[k] if r["id"] == i) for k in (t, 0)] for i in ("e0", "e1")]
            expected = 100 * _mean(1.0 if a > b else 0.0 if a < b else 0.5 for a, b in per_prompt)
            assert sampled["vs_initial_quality"]["win_rate"] == pytest.approx(expected)
    before = {t: (run / f"iter_{t}" / "eval_samples.jsonl").read_bytes() for t in (0, 1, 2)}
    run_iterations(build_config(raw))
    assert {t: (run / f"iter_{t}" / "eval_samples.jsonl").read_bytes() for t in (0, 1, 2)} == before
    report = write_report([run], tmp_path / "report").read_text()
    assert "sampled quality" in report and "sampled win rate vs initial" in report


def test_a_base_eval_shared_from_another_seed_draws_its_own_samples(raw_config, tmp_path):
    """The demo shares the initial model's greedy eval across seeds; its sampled answers depend on
    the seed, so they are not copied: the first evaluation that needs them draws pi_0's and
    completes iteration 0's eval.json."""

    source = raw_config(tmp_path / "seed0")
    source["experimental"] = {"eval_samples": 2}
    source["iterations"]["count"] = 1
    run_iterations(build_config(source), until=(1, "generate"))
    target = {**raw_config(tmp_path / "seed1"), "seed": 1, "experimental": source["experimental"], "iterations": {"count": 1}}
    RunDir(tmp_path / "seed1").adopt(RunDir(tmp_path / "seed0"), {0: ["eval"]}, same_seed=False)
    assert not (tmp_path / "seed1" / "iter_0" / "eval_samples.jsonl").exists()
    assert "sampled" not in json.loads((tmp_path / "seed1" / "iter_0" / "eval.json").read_text())
    run_iterations(build_config(target))
    own = read_jsonl(tmp_path / "seed1" / "iter_0" / "eval_samples.jsonl")
    assert [r["response"] for r in own] != [r["response"] for r in read_jsonl(tmp_path / "seed0" / "iter_0" /
                                                                              "eval_samples.jsonl")]
    initial = json.loads((tmp_path / "seed1" / "iter_0" / "eval.json").read_text())
    assert initial["sampled"]["quality_mean"] == pytest.approx(_mean(r["quality"] for r in own))
    assert "vs_initial" in json.loads((tmp_path / "seed1" / "iter_1" / "eval.json").read_text())["sampled"]


# --- redo ------------------------------------------------------------------------------------------


def test_following_the_no_pairs_hint_finishes_the_run(raw_config, tmp_path, monkeypatch):
    """Near-greedy sampling makes the tiny model end at once: pairing stops with the measured
    cause first and a command; that command, run as printed, redoes from the stage it names
    (sampling: the greedy initial evaluation does not read the temperature) and the run finishes,
    the replaced files kept in replaced/001/."""
    from ilrdpo import cli

    out = tmp_path / "run"
    raw = raw_config(out)
    raw["generation"]["temperature"] = 0.01
    with pytest.raises(UserInputError) as error:
        run_iterations(build_config(raw))
    message = str(error.value)
    assert "no preference pairs in iteration 1: 16 of 16 answers are empty" in message
    command = message.split(": ilrdpo run ", 1)[1]
    assert command == f"{out}/config.yaml --redo 1:generate generation.temperature=1.0"
    monkeypatch.setattr("sys.argv", ["ilrdpo", "run", *command.split()])
    cli.main()
    state = json.loads((out / "state.json").read_text())
    assert state["finished"]["2"] == STAGES
    assert (out / "replaced" / "001" / "iter_1" / "candidates.jsonl").is_file()
    assert not (out / "replaced" / "001" / "iter_0").exists()  # the initial evaluation stands
    assert "generation.temperature=1.0" not in (out / "replaced" / "001" / "config.yaml").read_text()
    assert load_config(out / "config.yaml").generation.temperature == 1.0


def test_redo_of_a_training_round_reproduces_it_and_keeps_the_old_files(base_run, raw_config, tmp_path):
    """--redo 2:train with the same config: iteration 1 untouched, iteration 2's train and eval
    computed again to the same bytes, the old ones in replaced/001/; a second redo takes 002."""
    out = copy_run(base_run[0], tmp_path)
    before = {k: v for k, v in mtimes(out).items() if k.startswith("iter_1/")}
    model = (out / "iter_2" / "model" / "model.safetensors").read_bytes()
    run_iterations(build_config(raw_config(out)), redo=(2, "train"))
    assert {k: v for k, v in mtimes(out).items() if k.startswith("iter_1/")} == before
    assert (out / "iter_2" / "model" / "model.safetensors").read_bytes() == model
    assert (out / "replaced" / "001" / "iter_2" / "model" / "model.safetensors").read_bytes() == model
    assert sorted(p.name for p in (out / "replaced" / "001" / "iter_2").iterdir()) == [
        "eval.json", "eval_answers.jsonl", "metrics.jsonl", "model", "ref_logps.json"]
    assert not (out / "replaced" / "001" / "iter_2" / "candidates.jsonl").exists()
    run_iterations(build_config(raw_config(out)), redo=(2, "eval"))
    assert sorted(p.name for p in (out / "replaced").iterdir()) == ["001", "002"]


def test_redo_is_refused_while_another_process_holds_the_run(base_run, raw_config, tmp_path):
    from ilrdpo.rundir import RunDir

    out = copy_run(base_run[0], tmp_path)
    before = mtimes(out)
    holder = RunDir(out)
    holder.lock("ilrdpo run")  # a second open file description: flock refuses it like another process
    try:
        with pytest.raises(UserInputError, match="in use by"):
            run_iterations(build_config(raw_config(out)), redo=(1, "generate"))
    finally:
        holder.unlock()
    assert mtimes(out) == before
    assert not (out / "replaced").exists()


@pytest.mark.unit
def test_the_end_of_a_run_says_what_is_written_and_why_lc_can_differ(tmp_path):
    """'report: ilrdpo report ...' read as if a report had been written: now an instruction; the
    per-iteration LC figure is explained against the report's refit."""
    from ilrdpo.eval_stage import run_summary_lines
    from ilrdpo.rundir import RunDir

    config = build_config({"iterations": {"count": 1}, "output_dir": str(tmp_path / "run")})
    summary = {"iteration": 1, "vs_initial": {"win_rate": 50.0, "lc_win_rate": 50.0}}
    lines = run_summary_lines(RunDir(tmp_path / "run"), config, [summary])
    assert lines[-1] == f"to write a report: ilrdpo report {tmp_path / 'run'} --out {tmp_path / 'run' / 'report'}"
    assert any("`ilrdpo report` fits once over all of them" in line for line in lines)


def test_keep_models_keeps_the_last_k_and_redo_refuses_to_start_from_a_removed_one(base_run, raw_config, tmp_path):
    """iterations.keep_models=1 on a finished two-iteration run (a neutral key: no stage reruns):
    iteration 1's model goes, the final one stays; a redo that would start from the removed
    model is refused before anything moves."""
    out = copy_run(base_run[0], tmp_path)
    run_iterations(build_config(raw_config(out), ["iterations.keep_models=1"]))
    assert not (out / "iter_1" / "model").exists()
    assert (out / "iter_2" / "model" / "model.safetensors").is_file()
    before = mtimes(out)
    with pytest.raises(UserInputError, match="iteration 1's model, which the redo starts from, was removed"):
        run_iterations(build_config(raw_config(out), ["iterations.keep_models=1"]), redo=(2, "generate"))
    assert mtimes(out) == before

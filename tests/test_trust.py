"""Training that really trains and a run directory nothing can damage (smoke tier, tiny Llama).

Mixed precision with float32 master weights, the run-directory lock, refusal to overwrite a
trained model, the config history, alpha decided when a train stage starts, input-file hashes,
empty answers, debris of killed writers, and a training round resumed from its checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ilrdpo.config import DataSettings, LossSettings, ModelSettings, TrainSettings, build_config
from ilrdpo.errors import UserInputError
from ilrdpo.faults import SimulatedCrash, reset
from ilrdpo.loop import run_iterations
from ilrdpo.models import load_policy
from ilrdpo.offline import run_offline
from ilrdpo.records import PreferencePair
from ilrdpo.rundir import RunDir
from ilrdpo.train import train_round

pytestmark = pytest.mark.smoke

TESTS = Path(__file__).resolve().parent
SCORER = TESTS / "helpers" / "scorer.py"
EXAMPLES = TESTS.parent / "examples"
PAIRS = [PreferencePair(prompt=f"Question {i}?", chosen=f"Answer {i}.", rejected=f"Something else entirely, {i}!")
         for i in range(12)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_settings(**overrides) -> TrainSettings:
    values = {"learning_rate": 5e-7, "epochs": 1, "batch_size": 1, "warmup_ratio": 0.0,
              "lr_scheduler": "constant", "max_length": 128}
    return TrainSettings(**{**values, **overrides})


# --- mixed precision -------------------------------------------------------------------------------


def trained_copy(tiny_model_dir, tokenizer, tmp_path, dtype: str, name: str):
    """Train a fresh copy loaded as `model.dtype: dtype` (12 steps at lr 5e-7); return
    (initial weights, trained model, metrics)."""
    model, _, _ = load_policy(ModelSettings(name_or_path=str(tiny_model_dir), dtype=dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_round(model, tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=train_settings(), data=DataSettings(),
                output_dir=tmp_path / name, compute_dtype={"float32": torch.float32, "bfloat16": torch.bfloat16,
                                                           "float16": torch.float16}[dtype])
    return before, model, read_jsonl(tmp_path / name / "metrics.jsonl")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_full_finetuning_moves_every_weight(tiny_model_dir, tokenizer, tmp_path, dtype):
    """model.dtype bfloat16 (or float16 with loss scaling) at lr 5e-7: float32 master weights take
    updates of ~5e-7 that a bfloat16 weight near 0.02 (step ~1.2e-4) would round away; essentially
    every trainable weight changes, and the per-step loss follows the float32 run within 0.01
    (autocast's half-precision matmuls are the only difference)."""
    before, model, metrics = trained_copy(tiny_model_dir, tokenizer, tmp_path, dtype, dtype)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    changed = {n: (p.detach() != before[n]) for n, p in model.named_parameters() if "embed" not in n}
    assert torch.cat([c.flatten() for c in changed.values()]).float().mean().item() > 0.99
    assert min(c.float().mean().item() for c in changed.values()) > 0.95  # norm weights included
    _, _, reference = trained_copy(tiny_model_dir, tokenizer, tmp_path, "float32", "float32")
    assert len(metrics) == len(reference) == 12
    for ours, theirs in zip(metrics, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-2)


def test_pure_bfloat16_weights_lose_small_updates(tiny_model_dir, tokenizer, tmp_path):
    """Why master weights: the same round on weights stored in bfloat16 leaves most unchanged."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_round(model, tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=train_settings(), data=DataSettings(),
                output_dir=tmp_path, compute_dtype=torch.bfloat16)
    changed = torch.cat([(p.detach() != before[n]).flatten() for n, p in model.named_parameters() if "embed" not in n])
    assert changed.float().mean().item() < 0.2


# --- a round resumed from its checkpoint -------------------------------------------------------------


def test_killed_round_resumes_from_its_checkpoint_to_the_same_weights(tiny_model_dir, tokenizer, tmp_path,
                                                                      monkeypatch):
    """save_steps 3 over 12 steps: a round killed after the checkpoint of step 6 resumes there
    (optimizer, scheduler, RNG, data order, reference log-probs restored) and ends with the
    weights and metrics of an uninterrupted round."""
    settings = train_settings(learning_rate=1e-3, save_steps=3, lr_scheduler="cosine", warmup_ratio=0.2)

    def fresh():
        return load_policy(ModelSettings(name_or_path=str(tiny_model_dir), dtype="float32"))[0]

    whole = fresh()
    train_round(whole, tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=settings, data=DataSettings(),
                output_dir=tmp_path / "whole", checkpoint_dir=tmp_path / "whole" / "checkpoint")
    out = tmp_path / "killed"
    reset()
    monkeypatch.setenv("ILRDPO_FAULT", "checkpoint:2")
    with pytest.raises(SimulatedCrash):
        train_round(fresh(), tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=settings, data=DataSettings(),
                    output_dir=out, checkpoint_dir=out / "checkpoint")
    monkeypatch.delenv("ILRDPO_FAULT")
    assert len(read_jsonl(out / "metrics.partial.jsonl")) == 6
    resumed = fresh()
    result = train_round(resumed, tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=settings, data=DataSettings(),
                         output_dir=out, checkpoint_dir=out / "checkpoint")
    assert result.resumed_from == 6
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "whole" / "metrics.jsonl"))
    assert not (out / "checkpoint").exists()


def test_checkpoint_of_other_settings_is_not_resumed(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    def fresh():
        return load_policy(ModelSettings(name_or_path=str(tiny_model_dir), dtype="float32"))[0]

    reset()
    monkeypatch.setenv("ILRDPO_FAULT", "checkpoint:1")
    with pytest.raises(SimulatedCrash):
        train_round(fresh(), tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=train_settings(save_steps=3),
                    data=DataSettings(), output_dir=tmp_path, checkpoint_dir=tmp_path / "checkpoint")
    monkeypatch.delenv("ILRDPO_FAULT")
    result = train_round(fresh(), tokenizer, PAIRS, loss=LossSettings(beta=0.2), train=train_settings(save_steps=3),
                         data=DataSettings(), output_dir=tmp_path, checkpoint_dir=tmp_path / "checkpoint")
    assert result.resumed_from == 0 and len(read_jsonl(tmp_path / "metrics.jsonl")) == 12


# --- the run directory -------------------------------------------------------------------------------


def offline_config(tiny_model_dir, out: Path, **extra):
    raw = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
           "data": {"pairs": str(EXAMPLES / "pairs.jsonl"), "max_examples": 4},
           "train": {"batch_size": 2, "max_length": 128}, "output_dir": str(out), **extra}
    return build_config(raw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_process_on_a_run_directory_is_refused_and_a_killed_holder_frees_it(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ilrdpo.rundir import RunDir; d = RunDir(sys.argv[1]); d.lock('ilrdpo run'); "
        "print('locked', flush=True); time.sleep(60)"), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserInputError, match=rf"{out}: in use by pid {holder.pid} on .*ilrdpo run"):
            run_offline(offline_config(tiny_model_dir, out))
        assert sorted(p.name for p in out.iterdir()) == ["lock"]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    run_offline(offline_config(tiny_model_dir, out))  # the kernel released the dead holder's lock
    assert (out / "model" / "model.safetensors").is_file()


def test_train_into_a_finished_folder_refuses_without_overwrite_and_changes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_offline(offline_config(tiny_model_dir, out))
    before = snapshot(out)
    with pytest.raises(UserInputError, match="a trained model is already there; pass --overwrite"):
        run_offline(offline_config(tiny_model_dir, out, loss={"beta": 0.3}))
    assert snapshot(out) == before
    run_offline(offline_config(tiny_model_dir, out, loss={"beta": 0.3}), overwrite=True)
    history = out / "config_history" / "001.yaml"
    assert history.read_bytes() == before["config.yaml"]  # the config of the replaced model is kept


def test_bad_pairs_file_writes_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    out = tmp_path / "run"
    with pytest.raises(UserInputError, match=f"{bad}:1: missing field 'rejected'"):
        run_offline(offline_config(tiny_model_dir, out, data={"pairs": str(bad)}))
    assert not out.exists()


def test_debris_of_killed_writers_is_removed_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    (out / "iter_1" / "model.staging").mkdir(parents=True)
    (out / "iter_1" / ".candidates.jsonl.x1y2.tmp").write_text("half a file")
    (out / "iter_1" / "candidates.jsonl").write_text("{}\n")
    removed = RunDir(out).remove_debris()
    assert len(removed) == 2
    assert [p.name for p in (out / "iter_1").iterdir()] == ["candidates.jsonl"]


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


def test_alpha_changed_before_the_train_stage_is_used(tiny_model_dir, tmp_path, monkeypatch):
    """Stopped in the score stage with alpha 0, resumed with alpha 0.5: no --force needed (train
    had not started), and training, state.json and the model card all use 0.5."""
    out = tmp_path / "run"
    reset()
    monkeypatch.setenv("ILRDPO_FAULT", "scores.partial.jsonl:1")
    with pytest.raises(SimulatedCrash):
        run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=0.0))
    monkeypatch.delenv("ILRDPO_FAULT")
    run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=0.5))
    assert json.loads((out / "state.json").read_text())["alpha"] == {"1": 0.5}
    card = json.loads((out / "iter_1" / "model" / "ilrdpo.json").read_text())
    assert card["hyperparameters"]["loss.alpha"] == 0.5 and "alpha=0.5" in card["method"]
    for m in read_jsonl(out / "iter_1" / "metrics.jsonl"):
        gap = m["length/chosen"] - m["length/rejected"]
        assert m["length/margin_term"] == pytest.approx(0.5 * gap, abs=1e-5)


def test_alpha_changed_after_training_started_needs_force_and_then_holds(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    reset()
    monkeypatch.setenv("ILRDPO_FAULT", "metrics.partial.jsonl:1")
    with pytest.raises(SimulatedCrash):
        run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=0.0))
    monkeypatch.delenv("ILRDPO_FAULT")
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


def test_relative_alpha_and_base_targets(tiny_model_dir, tokenizer, tmp_path):
    """alpha_relative: the per-token alpha used is alpha / median |gap| of the round's pairs;
    target_length 'base': each pair carries its prompt's mean initial answer length as target;
    every metrics line reports the share of pairs the length term saturates."""
    out = tmp_path / "run"
    run_iterations(loop_config(tiny_model_dir, tmp_path, out, loss__alpha=1.0, loss__alpha_relative=True,
                               loss__target_length="base", generation__num_samples=4))
    pairs = read_jsonl(out / "iter_1" / "pairs.jsonl")
    candidates = {json.dumps(c["prompt"]): c for c in read_jsonl(out / "iter_1" / "candidates.jsonl")}
    for pair in pairs:
        c = candidates[json.dumps(pair["prompt"])]
        answers = [(n, cut) for n, r, cut in zip(c["n_tokens"], c["responses"], c["truncated"]) if r.strip()]
        kept = [n for n, cut in answers if not cut] or [n for n, _ in answers]
        assert pair["target_length"] == round(sum(kept) / len(kept))
    raw_gaps = sorted(abs(len(tokenizer(p["chosen"], add_special_tokens=False)["input_ids"])
                          - len(tokenizer(p["rejected"], add_special_tokens=False)["input_ids"])) for p in pairs)
    state = json.loads((out / "state.json").read_text())
    assert state["alpha_setting"] == {"1": 1.0}
    assert state["alpha"]["1"] == pytest.approx(1.0 / max(raw_gaps[len(raw_gaps) // 2], 1))
    for m in read_jsonl(out / "iter_1" / "metrics.jsonl"):
        assert 0.0 <= m["length/saturated_share"] <= 1.0

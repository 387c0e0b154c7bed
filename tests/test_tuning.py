"""Hyperparameter search (ilrdpo.tuning; smoke tier): real short runs of the tiny model."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from helpers import SCORER
from ilrdpo.config import build_config, load_config
from ilrdpo.errors import UserInputError
from ilrdpo.loop import IterativeRun, run_iterations
from ilrdpo.tuning import search_space, shareable, tune

OBJECTIVE = "quality_mean"


@pytest.fixture
def study_config(tiny_model_dir, tmp_path):
    prompts, evals = tmp_path / "p.jsonl", tmp_path / "e.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in
                               ["Say hi.", "Name a colour.", "Count to three.", "What is ice?"]))
    evals.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Name a planet.", "Say bye."]))

    def make(**tune):
        return build_config({
            "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
            "data": {"prompts": str(prompts), "eval_prompts": str(evals)},
            "generation": {"num_samples": 2, "max_new_tokens": 6, "temperature": 1.0},
            "scoring": {"type": "python", "function": f"{SCORER}:char_count"}, "pairing": {"skip_truncated": False},
            "train": {"max_length": 64, "batch_size": 2, "warmup_ratio": 0.0}, "iterations": {"count": 1},
            "eval": {"length_anchors": False},
            "tune": {"space": {"train.learning_rate": {"type": "log_uniform", "low": 1e-5, "high": 1e-2},
                               "loss.alpha": {"type": "uniform", "low": 0.0, "high": 0.2}},
                     "objectives": [f"{OBJECTIVE}:maximize"], **tune},
            "output_dir": str(tmp_path / "study"), "seed": 0})
    return make


def test_study_runs_resumes_and_shares_the_first_round(study_config, tmp_path, monkeypatch):
    generated = []
    original = IterativeRun.generate
    monkeypatch.setattr(IterativeRun, "generate", lambda self, t: (generated.append((self.dir.root.name, t)),
                                                                   original(self, t))[1])
    config = study_config()
    study = tune(config, trials=3)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert generated == [("shared", 1)]  # iteration 1 sampled once for the whole study
    shared = (tmp_path / "study" / "shared" / "iter_1" / "candidates.jsonl").read_bytes()
    for n in range(3):
        assert (tmp_path / "study" / f"trial_{n:03d}" / "iter_1" / "candidates.jsonl").read_bytes() == shared

    with pytest.raises(UserInputError, match="exists; pass --resume"):
        tune(config, trials=1)
    study = tune(config, trials=2, resume=True)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]  # the three finished trials kept, none redone
    assert len(generated) == 1

    # the best config, run again with the same seed, reproduces the best trial's metric
    best = study.best_trial
    best_config = load_config(tmp_path / "study" / "best.yaml", [f"output_dir={tmp_path / 'again'}"])
    assert best_config.train.learning_rate == pytest.approx(best.params["train.learning_rate"])
    (_, again) = run_iterations(best_config)
    assert again[OBJECTIVE] == pytest.approx(best.value, abs=1e-9)
    assert (tmp_path / "study" / "plots" / "history.png").is_file()
    assert (tmp_path / "study" / "plots" / "importances.png").is_file()

    # a trial's run directory says where it came from, and `ilrdpo report` shows it
    from ilrdpo.evaluation.report import write_report

    trial = json.loads((tmp_path / "study" / f"trial_{best.number:03d}" / "trial.json").read_text())
    assert trial["trial"] == best.number and trial["params"] == best.params
    assert list(trial["objectives"].values()) == [pytest.approx(best.value)]
    text = write_report([tmp_path / "study" / f"trial_{best.number:03d}"], tmp_path / "report").read_text()
    assert "## From a hyperparameter study" in text and "train.learning_rate=" in text


def test_a_failing_trial_is_recorded_and_the_search_goes_on(study_config, tmp_path):
    """learning rates of 0.05-0.1 on the tiny model diverge (weight-drift rule): failed trials,
    with the error on the trial; the others complete."""
    config = study_config(space={"train.learning_rate": {"type": "categorical", "choices": [0.1, 1e-4]}})
    study = tune(config, trials=4)
    states = {t.params["train.learning_rate"]: t.state for t in study.trials}
    assert states.get(0.1, optuna.trial.TrialState.FAIL) == optuna.trial.TrialState.FAIL
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all("diverged" in t.user_attrs["error"] for t in failed)
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_two_objectives_give_a_pareto_set(study_config, tmp_path):
    config = study_config(objectives=[f"{OBJECTIVE}:maximize", "length.tokens_mean:minimize"])
    study = tune(config, trials=3)
    assert len(study.directions) == 2
    pareto = sorted((tmp_path / "study" / "pareto").glob("trial_*.yaml"))
    assert pareto and len(pareto) == len(study.best_trials)
    assert "# trial" in pareto[0].read_text().splitlines()[0]
    assert yaml.safe_load(pareto[0].read_text())["output_dir"].endswith("best_run")
    assert (tmp_path / "study" / "plots" / "pareto.png").is_file()


def test_space_defaults_and_sharing_rule(study_config):
    config = study_config(space={})
    assert set(search_space(config)) == {"train.learning_rate", "loss.beta", "loss.alpha"}
    assert shareable(search_space(config))
    assert not shareable({"generation.temperature": None})  # sampling settings change iteration 1's samples
    with pytest.raises(UserInputError, match="'tune.objectives': 'quality' is not"):
        tune(study_config(objectives=["quality"]), trials=1)

"""Mid-round checkpoints (smoke tier, tiny Llama): a killed round resumes to the same weights.
"""

from __future__ import annotations

import pytest
import torch

from helpers import constant_rate, crash_after, read_jsonl, short_pairs
from ilrdpo.config import DataSettings, LossSettings, ModelSettings
from ilrdpo.models import load_policy
from ilrdpo.train import train_round

pytestmark = pytest.mark.smoke

PAIRS = short_pairs()


# --- a round resumed from its checkpoint -------------------------------------------------------------


def test_killed_round_resumes_from_its_checkpoint_to_the_same_weights(tiny_model_dir, tokenizer, tmp_path,
                                                                      monkeypatch):
    """save_steps 3 over 12 steps: a round killed after the checkpoint of step 6 resumes there
    (optimizer, scheduler, RNG, data order, reference log-probs restored) and ends with the
    weights and metrics of an uninterrupted round."""
    settings = constant_rate(learning_rate=1e-3, save_steps=3, lr_scheduler="cosine", warmup_ratio=0.2)

    def fresh():
        return load_policy(ModelSettings(name_or_path=str(tiny_model_dir), dtype="float32"))[0]

    whole = fresh()
    train_round(whole, tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=settings, data=DataSettings(),
                output_dir=tmp_path / "whole", checkpoint_dir=tmp_path / "whole" / "checkpoint")
    out = tmp_path / "killed"
    crash_after(monkeypatch, "checkpoint:2", lambda: (
        train_round(fresh(), tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=settings, data=DataSettings(),
                    output_dir=out, checkpoint_dir=out / "checkpoint")))
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

    crash_after(monkeypatch, "checkpoint:1", lambda: (
        train_round(fresh(), tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=constant_rate(save_steps=3),
                    data=DataSettings(), output_dir=tmp_path, checkpoint_dir=tmp_path / "checkpoint")))
    result = train_round(fresh(), tokenizer, PAIRS, loss=LossSettings(beta=0.2), train=constant_rate(save_steps=3),
                         data=DataSettings(), output_dir=tmp_path, checkpoint_dir=tmp_path / "checkpoint")
    assert result.resumed_from == 0 and len(read_jsonl(tmp_path / "metrics.jsonl")) == 12



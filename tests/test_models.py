"""Mixed precision (smoke tier, tiny Llama): float32 master weights under a half compute dtype.

models.weight_dtype loads full fine-tuning in float32 when model.dtype is bfloat16 or float16;
train_round runs the forward under autocast and scales a float16 loss.
"""

from __future__ import annotations

import pytest
import torch

from helpers import constant_rate, read_jsonl, short_pairs
from ilrdpo.config import DataSettings, LossSettings, ModelSettings
from ilrdpo.models import load_policy
from ilrdpo.train import train_round

pytestmark = pytest.mark.smoke

PAIRS = short_pairs()


# --- mixed precision -------------------------------------------------------------------------------


def trained_copy(tiny_model_dir, tokenizer, tmp_path, dtype: str, name: str):
    """Train a fresh copy loaded as `model.dtype: dtype` (12 steps at lr 5e-7); return
    (initial weights, trained model, metrics)."""
    model, _, _ = load_policy(ModelSettings(name_or_path=str(tiny_model_dir), dtype=dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_round(model, tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=constant_rate(), data=DataSettings(),
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
    train_round(model, tokenizer, PAIRS, loss=LossSettings(beta=0.1), train=constant_rate(), data=DataSettings(),
                output_dir=tmp_path, compute_dtype=torch.bfloat16)
    changed = torch.cat([(p.detach() != before[n]).flatten() for n, p in model.named_parameters() if "embed" not in n])
    assert changed.float().mean().item() < 0.05  # measured: 1.0%




def test_a_half_precision_model_is_saved_in_its_compute_dtype(tiny_model_dir, tokenizer, tmp_path):
    """Full fine-tuning in bfloat16 keeps float32 master weights while training; the saved model
    is bfloat16 (half the disk), and the next round loads it back into float32 masters with the
    same values."""
    from safetensors import safe_open

    from ilrdpo.models import load_saved_policy, save_model

    settings = ModelSettings(name_or_path=str(tiny_model_dir), dtype="bfloat16")
    model, tok, _ = load_policy(settings)
    assert next(model.parameters()).dtype == torch.float32  # master weights
    out = save_model(model, tok, tmp_path / "model", {"title": "t"}, dtype=torch.bfloat16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        names = set(f.keys())
    assert dtypes == {torch.bfloat16}
    # the tied output head stays tied: written once, as save_pretrained writes the float32 model
    float32 = save_model(model, tok, tmp_path / "float32", {"title": "t"})
    with safe_open(str(float32 / "model.safetensors"), "pt") as f:
        assert names == set(f.keys())
    reloaded, _, _ = load_saved_policy(out, settings)
    original = dict(model.named_parameters())
    for name, param in reloaded.named_parameters():
        assert param.dtype == torch.float32
        torch.testing.assert_close(param, original[name].to(torch.bfloat16).float())


@pytest.mark.unit
def test_deepspeed_is_told_there_is_no_gpu_once_and_a_users_choice_is_kept(monkeypatch):
    from ilrdpo.models import quiet_deepspeed_detection

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    environ: dict[str, str] = {}
    quiet_deepspeed_detection(environ)
    assert environ == {"DS_ACCELERATOR": "cpu"}
    mine = {"DS_ACCELERATOR": "xpu"}
    quiet_deepspeed_detection(mine)
    assert mine == {"DS_ACCELERATOR": "xpu"}

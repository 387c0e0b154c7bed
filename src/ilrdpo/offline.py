"""`ilrdpo train`: one round of LR-DPO on a file or dataset of preference pairs."""

from __future__ import annotations

from pathlib import Path

from ilrdpo.config import Config, config_to_yaml
from ilrdpo.data import load_pairs
from ilrdpo.loss import method_name
from ilrdpo.models import hyperparameters, load_policy, save_model
from ilrdpo.preflight import check_config
from ilrdpo.progress import console, stage
from ilrdpo.records import atomic_write_text
from ilrdpo.train import TrainResult, train_round


def run_offline(config: Config) -> tuple[Path, TrainResult]:
    """`ilrdpo train`: one round of LR-DPO on config.data.pairs; returns (model folder, result)."""
    check_config(config, "train")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", config_to_yaml(config))
    pairs = load_pairs(config.data.pairs, config.data.pairs_split, config.data.max_examples)
    with stage("load model"):
        model, tokenizer, base_path = load_policy(config.model)
    with stage("train"):
        result = train_round(model, tokenizer, pairs, loss=config.loss, train=config.train, data=config.data,
                             output_dir=out, seed=config.seed, hparams=hyperparameters(config))
    method = method_name(config.loss.type, config.loss.alpha)
    card = {"title": f"{Path(base_path).name} + {method}", "base_model": config.model.name_or_path,
            "method": method, "data": f"{config.data.pairs} ({len(pairs)} pairs)",
            "hyperparameters": hyperparameters(config), "metrics": result.final}
    with stage("save"):
        model_dir = save_model(model, tokenizer, out / "model", card, merge_lora=config.model.merge_lora)
    console.print(f"saved {model_dir}  ({result.steps} steps, {result.tokens_per_s:.0f} tokens/s, "
                  f"final loss {result.final.get('loss', float('nan')):.4f})")
    return model_dir, result

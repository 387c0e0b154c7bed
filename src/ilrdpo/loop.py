"""Pipelines over the stages: offline LR-DPO on a pairs file, and the iterative loop."""

from __future__ import annotations

from pathlib import Path

from ilrdpo.config import Config, config_to_yaml
from ilrdpo.data import load_pairs
from ilrdpo.errors import UserInputError
from ilrdpo.models import load_policy, save_model
from ilrdpo.progress import console, stage
from ilrdpo.records import atomic_write_text
from ilrdpo.train import TrainResult, train_round


def method_name(config: Config) -> str:
    name = {"sigmoid": "DPO", "robust": "robust DPO", "ipo": "IPO", "hinge": "SLiC hinge",
            "simpo": "SimPO", "ld_dpo": "LD-DPO"}[config.loss.type]
    return f"LR-{name} (alpha={config.loss.alpha})" if config.loss.alpha > 0 else name


def hyperparameters(config: Config) -> dict:
    flat = {f"loss.{k}": v for k, v in config.loss.model_dump().items()}
    flat.update({f"train.{k}": v for k, v in config.train.model_dump().items() if k != "report_to"})
    flat["model.lora"] = "none" if config.model.lora is None else str(config.model.lora.model_dump())
    flat["seed"] = config.seed
    return flat


def run_offline(config: Config) -> tuple[Path, TrainResult]:
    """`ilrdpo train`: one round of LR-DPO on config.data.pairs; returns (model folder, result)."""
    if not config.data.pairs:
        raise UserInputError("data.pairs is required for `ilrdpo train` (a JSONL file or a dataset)")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", config_to_yaml(config))
    pairs = load_pairs(config.data.pairs, config.data.pairs_split, config.data.max_examples)
    with stage("load model"):
        model, tokenizer, base_path = load_policy(config.model)
    with stage("train"):
        result = train_round(model, tokenizer, pairs, loss=config.loss, train=config.train, data=config.data,
                             output_dir=out, seed=config.seed, hparams=hyperparameters(config))
    card = {"title": f"{Path(base_path).name} + {method_name(config)}", "base_model": config.model.name_or_path,
            "method": method_name(config), "data": f"{config.data.pairs} ({len(pairs)} pairs)",
            "hyperparameters": hyperparameters(config), "metrics": result.final}
    with stage("save"):
        model_dir = save_model(model, tokenizer, out / "model", card, merge_lora=config.model.merge_lora)
    console.print(f"saved {model_dir}  ({result.steps} steps, {result.tokens_per_s:.0f} tokens/s, "
                  f"final loss {result.final.get('loss', float('nan')):.4f})")
    return model_dir, result

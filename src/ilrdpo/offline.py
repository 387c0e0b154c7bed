"""`ilrdpo train`: one round of LR-DPO on a file or dataset of preference pairs."""

from __future__ import annotations

from pathlib import Path

from ilrdpo import engines, interrupts
from ilrdpo.alpha import per_unit_alpha
from ilrdpo.config import Config
from ilrdpo.data import load_pairs
from ilrdpo.decisions import stage_seed
from ilrdpo.errors import UserInputError
from ilrdpo.hub import hyperparameters, push_to_hub
from ilrdpo.loss_types import method_name
from ilrdpo.models import load_policy, resolve_dtype
from ilrdpo.preflight import check_config
from ilrdpo.progress import console, stage
from ilrdpo.rundir import RunDir
from ilrdpo.train import TrainResult, train_round


def run_offline(config: Config, overwrite: bool = False) -> tuple[Path, TrainResult]:
    """`ilrdpo train`: one round of LR-DPO on config.data.pairs; returns (model folder, result).

    Inputs are read and checked before anything is written; the folder is locked for the
    round; a finished model there is replaced only with overwrite, and only once the new one
    is saved. A killed round resumes from its last checkpoint when run again.
    """
    check_config(config, "train")
    rundir = RunDir(config.output_dir)
    pairs = load_pairs(config.data.pairs)
    model_dir = rundir.root / "model"
    engine = engines.launched()

    def no_model_there() -> None:
        if model_dir.exists() and not overwrite:
            raise UserInputError(f"{model_dir}: a trained model is already there; pass --overwrite to replace "
                                 "it, or choose another output_dir")

    with interrupts.where("the training round"), rundir.opened("ilrdpo train", no_model_there):
        rundir.remove_debris()
        rundir.record_config(config)
        with stage("load model"):
            model, tokenizer, base_path = load_policy(config.model)
        # the same decision as each round of `ilrdpo run` (alpha.per_unit_alpha)
        alpha = per_unit_alpha(config.loss.alpha, config, pairs, tokenizer)
        loss = config.loss.model_copy(update={"alpha": alpha})
        hparams = {**hyperparameters(config), "loss.alpha": alpha}
        with stage("train"):
            result = train_round(model, tokenizer, pairs, loss=loss, train=config.train, data=config.data,
                                 output_dir=rundir.root, seed=stage_seed(config.seed, 0, "train"), hparams=hparams,
                                 compute_dtype=resolve_dtype(config.model.dtype),
                                 checkpoint_dir=rundir.checkpoint(), engine=engine)
        method = method_name(config.loss.type, alpha)
        card = {"title": f"{Path(base_path).name} + {method}", "base_model": config.model.name_or_path,
                "method": method, "data": f"{config.data.pairs} ({len(pairs)} pairs)",
                "datasets": [] if Path(config.data.pairs).exists() else [config.data.pairs],
                "hyperparameters": hparams, "metrics": result.final}
        with stage("save"):
            model_dir = engine.save(model, tokenizer, model_dir, card, merge_lora=config.model.merge_lora,
                                    dtype=resolve_dtype(config.model.dtype))
    console.print(f"saved {model_dir}  ({result.steps} steps, {result.tokens_per_s:.0f} tokens/s, "
                  f"final loss {result.final.get('loss', float('nan')):.4f})")
    if config.model.push_to_hub:
        console.print(f"uploaded: {push_to_hub(model_dir, config.model.push_to_hub)}")
    return model_dir, result

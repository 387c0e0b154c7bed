"""Experiment trackers (TensorBoard, Weights & Biases) through accelerate's tracker classes.

One tracker run per `ilrdpo run` (or `ilrdpo train`): training metrics under `train/` with a
global step that continues across iterations (iteration t's step s is logged at the steps of
iterations 1..t-1 plus s), and each iteration's evaluation under `eval/` at the global step where
its training ended (iteration 0 at step 0). W&B: project $WANDB_PROJECT, else "ilrdpo"; run
name the output folder's name (as W&B's own variables do, $WANDB_NAME overrides it). TensorBoard writes to
OUTPUT_DIR/logs. Only the main process logs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ilrdpo import ranks

# eval.json entries logged per iteration (eval/<name>), when present
EVAL_METRICS = {
    "length": ("length", "tokens_mean"), "quality": ("quality_mean",), "reward": ("reward_mean",),
    "truncated_share": ("length", "truncated_share"),
    "win_rate_vs_initial": ("vs_initial", "win_rate"), "lc_win_rate_vs_initial": ("vs_initial", "lc_win_rate"),
    "win_rate_vs_previous": ("vs_previous", "win_rate"), "lc_win_rate_vs_previous": ("vs_previous", "lc_win_rate"),
    "alpha": ("alpha",), "pairs": ("pairs/count",), "samples_length": ("gen/length_mean",),
    "perplexity_initial": ("perplexity_initial",),
    "sampled_length": ("sampled", "length", "tokens_mean"), "sampled_quality": ("sampled", "quality_mean"),
    "sampled_win_rate_vs_initial": ("sampled", "vs_initial", "win_rate"),
    "sampled_lc_win_rate_vs_initial": ("sampled", "vs_initial", "lc_win_rate"),
}


def tracker_arguments(name: str, output_dir: Path, run_name: str | None = None) -> dict[str, Any]:
    """The keyword arguments of accelerate's tracker class for `name`."""
    run_name = run_name or os.environ.get("WANDB_NAME") or Path(output_dir).name
    if name == "tensorboard":
        return {"run_name": run_name, "logging_dir": Path(output_dir) / "logs"}
    # accelerate passes extra keywords to wandb.init; its run_name is wandb's project
    return {"run_name": os.environ.get("WANDB_PROJECT") or "ilrdpo", "name": run_name}


class RunTracker:
    """The trackers of train.report_to for one run; a no-op without any (or off the main process)."""

    def __init__(self, report_to: list[str], output_dir: Path, hparams: dict, *,
                 run_name: str | None = None) -> None:
        self.trackers: list = []
        if not report_to or not ranks.is_main():
            return
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        classes = {"tensorboard": TensorBoardTracker, "wandb": WandBTracker}
        for name in report_to:
            tracker = classes[name](**tracker_arguments(name, output_dir, run_name))
            tracker.start()
            # hparams must be scalars for TensorBoard
            tracker.store_init_configuration({k: v for k, v in hparams.items()
                                              if isinstance(v, (int, float, str, bool))})
            self.trackers.append(tracker)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_train(self, record: dict[str, Any], step: int) -> None:
        self.log({f"train/{k}": v for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}, step)

    def log_eval(self, summary: dict[str, Any], step: int) -> None:
        values = {}
        for name, path in EVAL_METRICS.items():
            value: Any = summary
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"eval/{name}"] = value
        self.log(values, step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

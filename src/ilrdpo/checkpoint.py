"""Mid-round training checkpoints: a killed round resumes to the weights an uninterrupted one reaches."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ilrdpo import ranks
from ilrdpo.config import LossSettings, TrainSettings
from ilrdpo.engines import Engine
from ilrdpo.errors import disk_writes
from ilrdpo.faults import fault_point
from ilrdpo.progress import console
from ilrdpo.records import PreferencePair


def round_fingerprint(pairs: list[PreferencePair], loss: LossSettings, train: TrainSettings, seed: int) -> str:
    """What a checkpoint must agree with to be resumed from: the data and every setting that
    shapes the updates (save_steps, trackers and the batching switches, which change only round-off,
    excluded)."""
    settings = {"loss": loss.model_dump(), "seed": seed,
                "train": train.model_dump(exclude={"save_steps", "report_to", "max_tokens_per_batch"}),
                "pairs": [json.dumps(p.__dict__, sort_keys=True, ensure_ascii=False) for p in pairs]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a nested state (what a save of it needs on disk, about)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


FORMAT = 2  # weights and optimizer state keyed by parameter name (torch.distributed.checkpoint.state_dict)


@dataclass
class Checkpointer:
    """checkpoint/state.pt: trainable weights, optimizer, scheduler, scaler, RNG, reference
    log-probs and step. Written atomically (temp file + rename); read with weights_only. The
    engine gathers and loads the whole weights and optimizer state, whatever the sharding."""

    folder: Path | None
    fingerprint: str
    save_steps: int
    engine: Engine = field(default_factory=Engine)

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / "state.pt"

    def load(self) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
            # a torn or foreign file: start the round afresh
            console.print(f"[yellow]{self.path}: unreadable checkpoint ({type(error).__name__}); "
                          "training starts from step 1[/yellow]")
            return None
        if state.get("format") != FORMAT:
            console.print(f"[yellow]{self.path}: checkpoint of an older ilrdpo; training starts from step 1[/yellow]")
            return None
        if state.get("fingerprint") != self.fingerprint:
            console.print(f"[yellow]{self.path}: checkpoint of other pairs or settings; training starts "
                          "from step 1[/yellow]")
            return None
        return state

    def save(self, step: int, model, optimizer, scheduler, scaler, ref_logps, tokens: int) -> None:
        if self.folder is None or self.save_steps <= 0 or step % self.save_steps:
            return
        # whole trainable weights and optimizer state by parameter name, whether the model is sharded
        # (FSDP: every process gives its shards to the main one) or not: resumable either way
        params = self.engine.full_state_dict(model, trainable_only=True)
        optimizer_state = self.engine.full_optimizer_state(model, optimizer)
        if not ranks.is_main():
            return  # under several processes the main one saves (replicas are identical)
        state = {"fingerprint": self.fingerprint, "step": step, "tokens": tokens, "format": FORMAT,
                 "params": params, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                 "rng": torch.get_rng_state(), "ref_logps": ref_logps}
        tmp = self.folder / ".state.pt.tmp"
        with disk_writes(self.folder, tensor_bytes(state)):  # a full disk keeps the last checkpoint
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                torch.save(state, tmp)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, self.path)
        fault_point("checkpoint")

    def restore(self, state: dict, model, optimizer, scheduler, scaler) -> None:
        self.engine.load_full_state(model, optimizer, state["params"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])

    def remove(self) -> None:
        if self.folder is not None and ranks.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)

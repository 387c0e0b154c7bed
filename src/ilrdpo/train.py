"""One round of preference training (LR-DPO and its loss family) on a list of pairs.

Order of work:
  1. tokenise the pairs (prompt via chat template, answers appended as ids) and truncate;
  2. reference log-probs, once, with the model as it is now (or its adapter disabled), before
     any update: pi_ref is this round's starting point, so no second model is held in memory;
  3. length-grouped micro-batches (ilrdpo.batching), chosen and rejected rows in one forward pass; with
     prefix sharing (batching.PREFIX_SHARING) one row per pair (prompt computed once, logprobs.shared_prefix_logps);
     with train.max_tokens_per_batch each step's pairs re-split into micro-batches of at most
     that many positions, each micro-batch's loss weighted by its share of the step's pairs;
  4. AdamW, warmup then decay, gradient accumulation, clipping, run by this process's parallel
     engine (ilrdpo.engines: plain, DDP, FSDP, ZeRO); one metrics line per step;
     a divergence guard after every step; a checkpoint every train.save_steps steps, from which
     a killed round resumes to the same weights.

Mixed precision: with a bfloat16 or float16 compute dtype, full fine-tuning keeps float32
master weights and optimizer state (models.load_policy loads them in float32) and runs the
forward under autocast; float16 also scales the loss (GradScaler). Memory per parameter:
4 (weights) + 4 (gradient) + 8 (AdamW moments) = 16 bytes, against 8 for pure bfloat16, which
rounds away updates smaller than half a bfloat16 step (lr 5e-7 on weights near 0.02 moves ~0.5%
of them). LoRA keeps its frozen base in the compute dtype and its adapter in float32.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import get_scheduler

from ilrdpo import engines, ranks
from ilrdpo.batching import (
    autocast,
    batch_logps,
    collate,
    device_and_dtype,
    micro_batches,
    shares_prefix,
    to_device,
)
from ilrdpo.checkpoint import Checkpointer, round_fingerprint
from ilrdpo.config import DataSettings, LossSettings, TrainSettings
from ilrdpo.data import TokenizedPair, length_grouped_batches, tokenize_pairs
from ilrdpo.errors import UserInputError
from ilrdpo.faults import fault_point
from ilrdpo.files import append_jsonl, read_jsonl_tolerant, write_jsonl
from ilrdpo.guard import DivergenceGuard
from ilrdpo.loss import LOSSES, REFERENCE_FREE, length_reversed, pair_accuracy, preference_loss
from ilrdpo.progress import console, progress_bar
from ilrdpo.records import PreferencePair
from ilrdpo.tracking import RunTracker


@dataclass
class TrainResult:
    steps: int
    n_pairs: int
    n_truncated: int
    tokens_per_s: float
    final: dict[str, float] = field(default_factory=dict)
    ref_logps: list[list[float]] | None = None  # (P, 2) [chosen, rejected], as used
    resumed_from: int = 0  # step of the checkpoint this round continued from (0: a fresh start)


@torch.no_grad()
def reference_logps(model, examples: list[TokenizedPair], pad_id: int, loss: LossSettings,
                    train: TrainSettings, disable_adapter: bool = False,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(P, 2) reference log-probs [chosen, rejected] of every pair under the current weights."""
    device, compute_dtype = device_and_dtype(model, compute_dtype)
    out = torch.zeros(len(examples), 2)
    shared_prefix = shares_prefix(device)
    batches = length_grouped_batches([e.row_tokens for e in examples], train.batch_size * 2, seed=0)
    batches = [b for group in batches for b in micro_batches(examples, [group], train, shared_prefix)]
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with adapter_off, progress_bar("reference log-probs", len(examples)) as bar:
        for indices in [batches[k] for k in ranks.mine(len(batches))]:  # batch k to process k % W
            batch = to_device(collate(model, [examples[i] for i in indices], pad_id, shared_prefix), device)
            with autocast(device, compute_dtype):
                logps = batch_logps(model, batch, loss).cpu()  # whole weights: no engine yet
            out[indices, 0], out[indices, 1] = logps[:len(indices)], logps[len(indices):]
            bar.advance(len(indices))
    model.train(was_training)
    return ranks.all_sum(out)  # each row was filled by exactly one process


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """The fused AdamW kernel (one launch for all tensors) exists for float params on CPU and CUDA."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
               for p in params)


def _tokenize(tokenizer, pairs: list[PreferencePair], train: TrainSettings, data: DataSettings, length_unit: str):
    return tokenize_pairs(tokenizer, pairs, max_length=train.max_length,
                          use_chat_template=data.use_chat_template, system_prompt=data.system_prompt,
                          length_unit=length_unit)


def pair_reference_logps(model, tokenizer, pairs: list[PreferencePair], loss: LossSettings, train: TrainSettings,
                         data: DataSettings, disable_adapter: bool = False,
                         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(P, 2) log-probs of the pairs under `model`, tokenised exactly as train_round does."""
    examples = _tokenize(tokenizer, pairs, train, data, loss.length_unit)
    return reference_logps(model, examples, tokenizer.pad_token_id, loss, train, disable_adapter, compute_dtype)


def _schedule(total_micro: int, batch_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    """The micro-batches of all epochs in order; a fractional last epoch takes a prefix."""
    order: list[list[int]] = []
    epoch = 0
    while len(order) < total_micro:
        order.extend(length_grouped_batches(lengths, batch_size, seed + epoch))
        epoch += 1
    return order[:total_micro]


# --- the round -----------------------------------------------------------------------------------


@dataclass
class RoundSetup:
    examples: list[TokenizedPair]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    schedule: list[list[int]]
    total_steps: int
    n_batches: int
    engine: engines.Engine  # owns the forward, backward, reduction, clipping and step (ilrdpo.engines)


def _setup(model, examples, train: TrainSettings, seed: int, device, compute_dtype,
           engine: engines.Engine) -> RoundSetup:
    """Optimizer, learning-rate schedule, loss scaler and the micro-batch order of all epochs."""
    # after the reference pass, which every process runs on whole weights (float16 is refused up
    # front under sharding, preflight.check_config)
    engine.prepare(model, train.gradient_checkpointing, compute_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay,
                                  fused=_fused_ok(params) and engine.fused_optimizer)
    n_batches = math.ceil(len(examples) / train.batch_size)
    total_micro = max(1, math.ceil(train.epochs * n_batches))
    total_steps = math.ceil(total_micro / train.grad_accum)
    scheduler = get_scheduler(
        "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler,
        optimizer, num_warmup_steps=int(train.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    # float16 has too few exponent bits for small gradients: scale the loss (bfloat16 does not need it).
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    schedule = _schedule(total_micro, train.batch_size, [e.row_tokens for e in examples], seed)
    engine.attach(model, optimizer, train.max_grad_norm, compute_dtype)  # the schedule stays ours
    return RoundSetup(examples, params, optimizer, scheduler, scaler, schedule, total_steps, n_batches, engine)


def _resume_metrics(partial: Path, final: Path, step: int) -> None:
    """The metrics file of a resumed round: the lines of steps 1..step, from where they are."""
    source = partial if partial.exists() else final
    rows = [r for r in read_jsonl_tolerant(source) if r.get("step", 0) <= step]
    write_jsonl(partial, rows)


def _tokenize_round(tokenizer, pairs: list[PreferencePair], loss: LossSettings, train: TrainSettings,
                    data: DataSettings) -> tuple[list[TokenizedPair], int]:
    examples = _tokenize(tokenizer, pairs, train, data, loss.length_unit)
    n_truncated = sum(e.truncated for e in examples)
    if n_truncated:
        console.print(f"[yellow]{n_truncated} of {len(examples)} pairs truncated to "
                      f"train.max_length={train.max_length}[/yellow]")
    return examples, n_truncated


def train_round(model, tokenizer, pairs: list[PreferencePair], *, loss: LossSettings, train: TrainSettings,
                data: DataSettings, output_dir: str | Path, seed: int = 0,
                ref_logps: torch.Tensor | None = None, ref_adapter_disabled: bool = False,
                hparams: dict | None = None, compute_dtype: torch.dtype | None = None,
                checkpoint_dir: str | Path | None = None, run_name: str | None = None,
                tracker: RunTracker | None = None, step_offset: int = 0,
                engine: engines.Engine | None = None) -> TrainResult:
    """Train `model` in place for train.epochs over `pairs`; metrics to output_dir/metrics.jsonl
    (written as metrics.partial.jsonl while the round runs, renamed when it ends well).

    ref_logps: precomputed (P, 2) reference log-probs (e.g. from the initial model); by default
    they are computed here from the model before its first update. compute_dtype: the autocast
    dtype (default: the weights' dtype). checkpoint_dir: where a checkpoint is kept every
    train.save_steps steps; a valid one found there is resumed from. tracker: the run's tracker
    (ilrdpo.tracking), steps logged at step_offset + step; without one, train.report_to opens a
    tracker run for this round alone. engine: the parallel engine (default: the launcher's).
    """
    if not pairs:
        raise UserInputError("no preference pairs to train on")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device, compute_dtype = device_and_dtype(model, compute_dtype)
    engine = engine or engines.launched()
    metrics_path, partial_path = output_dir / "metrics.jsonl", output_dir / "metrics.partial.jsonl"
    checkpoints = Checkpointer(None if checkpoint_dir is None else Path(checkpoint_dir),
                               round_fingerprint(pairs, loss, train, seed), train.save_steps, engine)
    torch.manual_seed(seed)

    # 1. tokenise
    examples, n_truncated = _tokenize_round(tokenizer, pairs, loss, train, data)

    # 2. reference log-probs, before any update (the weights must still be pi_ref's); a resumed
    #    round takes them from its checkpoint, since the weights have moved since.
    resumed = checkpoints.load()
    if resumed is not None:
        ref_logps = resumed["ref_logps"]
    elif loss.type not in REFERENCE_FREE and ref_logps is None:
        ref_logps = reference_logps(model, examples, tokenizer.pad_token_id, loss, train, ref_adapter_disabled,
                                    compute_dtype)

    # 3. optimizer and schedule; a resumed round's state and metrics lines
    setup = _setup(model, examples, train, seed, device, compute_dtype, engine)
    start_step, tokens = _start(resumed, checkpoints, model, setup, partial_path, metrics_path)

    # 4. the loop
    steps = RoundSteps(model, setup, tokenizer.pad_token_id, loss, train, ref_logps, device, compute_dtype,
                       partial_path, checkpoints, step_offset)
    with _tracking(tracker, train, output_dir, hparams, run_name) as round_tracker:
        result = steps.run(start_step, tokens, round_tracker)
    if ranks.is_main():
        os.replace(partial_path, metrics_path)
        fault_point(metrics_path.name)
    checkpoints.remove()
    result.n_truncated, result.resumed_from = n_truncated, start_step
    result.ref_logps = None if ref_logps is None else ref_logps.tolist()
    return result


@contextlib.contextmanager
def _tracking(tracker: RunTracker | None, train: TrainSettings, output_dir: Path, hparams: dict | None,
              run_name: str | None) -> Iterator[RunTracker]:
    """The run's tracker, or one opened for this round alone (train.report_to)."""
    if tracker is not None:
        yield tracker
        return
    own = RunTracker(train.report_to, output_dir, hparams or {}, run_name=run_name)
    try:
        yield own
    finally:
        own.finish()


def _start(resumed: dict | None, checkpoints: Checkpointer, model, setup: RoundSetup, partial_path: Path,
           metrics_path: Path) -> tuple[int, int]:
    """(step, tokens) the round starts from: a checkpoint's, restored, or (0, 0) with no old metrics."""
    if resumed is None:
        if ranks.is_main():
            partial_path.unlink(missing_ok=True)
        return 0, 0
    checkpoints.restore(resumed, model, setup.optimizer, setup.scheduler, setup.scaler)
    if ranks.is_main():
        _resume_metrics(partial_path, metrics_path, resumed["step"])
    console.print(f"resuming training from the checkpoint at step {resumed['step']}")
    return resumed["step"], resumed["tokens"]


@dataclass
class RoundSteps:
    """The optimizer steps of a round: what every step reads."""

    model: torch.nn.Module
    setup: RoundSetup
    pad_id: int
    loss: LossSettings
    train: TrainSettings
    ref_logps: torch.Tensor | None
    device: torch.device
    compute_dtype: torch.dtype
    metrics_path: Path
    checkpoints: Checkpointer
    step_offset: int

    def run(self, start_step: int, tokens: int, tracker: RunTracker) -> TrainResult:
        """Optimizer steps start_step+1 .. total_steps; one metrics line each."""
        setup, train, engine = self.setup, self.train, self.setup.engine
        self.model.train()
        guard = DivergenceGuard(setup.params, loss_scaling=setup.scaler.is_enabled(),
                                grad_floor=train.max_grad_norm, norm=engine.weight_norm)
        start, record = time.perf_counter(), {}
        with progress_bar("training", setup.total_steps, done=start_step) as bar:
            for step in range(start_step + 1, setup.total_steps + 1):
                sums, step_tokens = self.accumulate(step)
                tokens += step_tokens
                guard.check_loss(step, sums["loss"])
                learning_rate = setup.scheduler.get_last_lr()[0]  # the rate this step used
                grad_norm = engine.step(setup.optimizer, setup.scaler, setup.params, train.max_grad_norm)
                setup.scheduler.step()
                guard.check(step, sums["loss"], grad_norm, sums["loss/at_reference"])
                record = {"step": step, "epoch": round((step - 1) * train.grad_accum / max(setup.n_batches, 1), 4),
                          **sums, "grad_norm": grad_norm, "learning_rate": learning_rate,
                          "tokens": tokens, "elapsed_s": round(time.perf_counter() - start, 3)}
                if ranks.is_main():
                    append_jsonl(self.metrics_path, record)
                tracker.log_train(record, self.step_offset + step)
                self.checkpoints.save(step, self.model, setup.optimizer, setup.scheduler, setup.scaler,
                                      self.ref_logps, tokens)
                bar.advance(1, loss=f"{sums['loss']:.4f}", acc=f"{sums['rewards/accuracies']:.2f}")
        if train.gradient_checkpointing:
            self.model.gradient_checkpointing_disable()
        elapsed = time.perf_counter() - start
        return TrainResult(steps=setup.total_steps, n_pairs=len(setup.examples), n_truncated=0,
                           tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0, final=record)

    def accumulate(self, step: int) -> tuple[dict[str, float], int]:
        """Forward and backward of optimizer step `step`'s micro-batches, each process its share of
        every one, weighted by the step's global pair count; the step's metrics (means over its
        pairs) and token count, summed over processes, and its gradients, reduced by the engine."""
        setup, train, engine = self.setup, self.train, self.setup.engine
        shared_prefix = shares_prefix(self.device)
        group = setup.schedule[(step - 1) * train.grad_accum:step * train.grad_accum]
        group = micro_batches(setup.examples, group, train, shared_prefix)
        n_in_step = sum(len(ix) for ix in group)
        sums = dict.fromkeys(STATS, 0.0)
        step_tokens = 0
        backward = functools.partial(engine.backward, scaler=setup.scaler)
        for group_indices in group:
            part = engine.share(group_indices, n_in_step)
            if part is None:
                continue
            indices, share, weight = part
            batch = to_device(collate(self.model, [setup.examples[i] for i in indices], self.pad_id, shared_prefix),
                              self.device)
            with autocast(self.device, self.compute_dtype):
                policy = engine.forward(self.model, batch_logps, self.model, batch, self.loss)  # (2B,)
            stats = _micro_step(policy, batch, self.ref_logps, indices, self.loss, weight, backward)
            if share:
                for key in STATS:
                    sums[key] += stats[key] * share
                step_tokens += sum(setup.examples[i].row_tokens for i in indices)
        totals = ranks.all_sum(torch.tensor([*sums.values(), step_tokens], dtype=torch.float64))
        engine.reduce_gradients(setup.params)
        return dict(zip(STATS, totals[:-1].tolist())), int(totals[-1])


def loss_at_reference(length_term: torch.Tensor, loss: LossSettings) -> torch.Tensor:
    """(B,) each pair's loss with a zero log-ratio margin (policy = reference; SimPO: equal average
    log-probs), where only the length term (and SimPO's gamma) is left."""
    margin = length_term.float() - (loss.simpo_gamma if loss.type == "simpo" else 0.0)
    return LOSSES[loss.type].fn(margin, loss.beta, loss.label_smoothing)


SATURATED_LOGITS = 3.0  # sigmoid(3) = 0.95: past this the length term decides the pair's gradient
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected", "length/chosen", "length/rejected", "length/margin_term", "length/saturated_share",
         "length/reversed_share", "loss/at_reference")


def _micro_step(policy: torch.Tensor, batch: dict[str, torch.Tensor], ref_logps: torch.Tensor | None,
                indices: list[int], loss: LossSettings, weight: float, backward) -> dict[str, float]:
    """Loss and backward of one micro-batch; returns its metrics (means over its pairs). One host
    sync: the metrics and the loss's finiteness come to the host in one transfer (on a GPU each
    `.item()` waits for the device), which then decides the backward (Engine.backward)."""
    n = len(indices)
    lengths, scored = batch["lengths"], batch["scored_tokens"]
    ref = ref_logps[indices].to(policy.device) if ref_logps is not None else None  # (B, 2)
    target = batch.get("target_length", loss.target_length)
    out = preference_loss(
        policy[:n], policy[n:], None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
        lengths[:n], lengths[n:], loss_type=loss.type, beta=loss.beta, alpha=loss.alpha,
        target_length=target, label_smoothing=loss.label_smoothing, simpo_gamma=loss.simpo_gamma,
        chosen_scored_tokens=scored[:n], rejected_scored_tokens=scored[n:],
    )
    means = {
        "loss": out.losses.mean(),
        "rewards/chosen": out.chosen_rewards.mean(),
        "rewards/rejected": out.rejected_rewards.mean(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
        "rewards/accuracies": pair_accuracy(out.chosen_rewards, out.rejected_rewards).mean(),
        "logps/chosen": policy[:n].mean(),
        "logps/rejected": policy[n:].mean(),
        "length/chosen": lengths[:n].mean(),
        "length/rejected": lengths[n:].mean(),
        "length/margin_term": out.length_term.mean(),
        # pairs whose length term alone puts the loss in the sigmoid's flat tails (|term| > 3 logits)
        "length/saturated_share": (out.length_term.abs() > SATURATED_LOGITS).float().mean(),
        # pairs the loss learns the other way round (IPO, cDPO: the length term exceeds the target margin)
        "length/reversed_share": length_reversed(out.length_term, loss.type, loss.label_smoothing).float().mean(),
        # the loss these pairs have where the policy equals the reference (their log-ratio margin 0):
        # the scale of a healthy loss for the divergence guard; with a target margin (IPO) it grows
        # with each pair's length term
        "loss/at_reference": loss_at_reference(out.length_term, loss).mean(),
    }
    # float64 holds every float32 mean exactly: the values are those .item() gives one by one
    values = torch.stack([m.detach().to(torch.float64) for m in means.values()]
                         + [torch.isfinite(out.losses).all().to(torch.float64)]).tolist()  # (len(STATS) + 1,)
    backward(out.losses, weight, finite=values[-1] == 1.0)
    return dict(zip(means, values[:-1]))

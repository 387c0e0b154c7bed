"""One round of preference training (LR-DPO and its loss family) on a list of pairs.

Order of work:
  1. tokenise the pairs (prompt via chat template, answers appended as ids) and truncate;
  2. reference log-probs, once, with the model as it is now (or its adapter disabled), before
     any update: pi_ref is this round's starting point, so no second model is held in memory;
  3. length-grouped micro-batches, chosen and rejected rows in one forward pass; with
     train.prefix_sharing one row per pair (prompt computed once, logprobs.shared_prefix_logps),
     and with train.packing several pairs per row (no padding between them);
     with train.max_tokens_per_batch each step's pairs re-split into micro-batches of at most
     that many positions, each micro-batch's loss weighted by its share of the step's pairs;
  4. AdamW, warmup then decay, gradient accumulation, clipping; one metrics line per step;
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
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ilrdpo import distributed, zero
from ilrdpo.checkpoint import Checkpointer, round_fingerprint
from ilrdpo.config import DataSettings, LossSettings, TrainSettings
from ilrdpo.data import (
    TokenizedPair,
    collate_pairs,
    collate_shared_prefix,
    length_grouped_batches,
    split_by_token_budget,
    tokenize_pairs,
)
from ilrdpo.errors import TrainingDiverged, UserInputError
from ilrdpo.faults import fault_point
from ilrdpo.logprobs import ld_weights, sequence_logps, shared_prefix_logps, shared_prefix_supported
from ilrdpo.loss import LOSSES, REFERENCE_FREE, length_reversed, pair_accuracy, preference_loss
from ilrdpo.progress import console, progress_bar
from ilrdpo.records import PreferencePair, append_jsonl, read_jsonl_tolerant, write_jsonl
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


def autocast(device: torch.device, compute_dtype: torch.dtype):
    """Autocast to the compute dtype when it is a half type, on CPU and CUDA alike."""
    if compute_dtype in (torch.bfloat16, torch.float16) and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=compute_dtype)
    return contextlib.nullcontext()


def shares_prefix(train: TrainSettings, device: torch.device) -> bool:
    """train.prefix_sharing resolved for this device: auto is on where it was measured to win (CPU)."""
    return train.prefix_sharing == "on" or (train.prefix_sharing == "auto" and device.type == "cpu")


def packs(train: TrainSettings, shared_prefix: bool) -> bool:
    """train.packing where it applies: several pairs per row of the prefix-shared layout."""
    return shared_prefix and train.packing


def _collate(model, examples: list[TokenizedPair], pad_id: int, shared_prefix: bool,
             pack: bool = False) -> dict[str, torch.Tensor]:
    """The prefix-shared layout (packed with `pack`) where it is exact for this model and width,
    else [chosen; rejected] rows."""
    if shared_prefix:
        width = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
        if shared_prefix_supported(model, width):
            return collate_shared_prefix(examples, pad_id, pack=pack)
    return collate_pairs(examples, pad_id)


def _micro_batches(examples: list[TokenizedPair], batches: list[list[int]], train: TrainSettings,
                   shared_prefix: bool) -> list[list[int]]:
    """The pairs of `batches`, re-split to train.max_tokens_per_batch positions when it is set."""
    if train.max_tokens_per_batch is None:
        return batches
    return split_by_token_budget(examples, [i for b in batches for i in b], shared_prefix,
                                 train.max_tokens_per_batch, pack=packs(train, shared_prefix))


def _batch_logps(model, batch: dict[str, torch.Tensor], loss: LossSettings, chunk: int):
    if distributed.is_fsdp(model):  # inside the root's forward, so FSDP gathers and reduces its weights
        return model.run_sharded(_whole_batch_logps, model, batch, loss, chunk)
    engine = zero.engine_of(model)
    if engine is not None:  # through the engine's forward, which opens its backward bookkeeping
        return zero.forward(engine, _whole_batch_logps, model, batch, loss, chunk)
    return _whole_batch_logps(model, batch, loss, chunk)


def _whole_batch_logps(model, batch: dict[str, torch.Tensor], loss: LossSettings, chunk: int):
    if "segments" in batch:
        ld_alpha = loss.ld_alpha if loss.type == "ld_dpo" else None
        return shared_prefix_logps(model, batch, ld_alpha=ld_alpha, chunk_size=chunk)[0]  # (2B,)
    mask = batch["response_mask"]
    if loss.type == "ld_dpo":
        mask = ld_weights(mask, mask.shape[0] // 2, loss.ld_alpha)
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], mask, chunk_size=chunk)
    return logps.float()  # (2B,)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _device_and_dtype(model, compute_dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    first = next(model.parameters())
    return first.device, compute_dtype or first.dtype


@torch.no_grad()
def reference_logps(model, examples: list[TokenizedPair], pad_id: int, loss: LossSettings,
                    train: TrainSettings, disable_adapter: bool = False,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(P, 2) reference log-probs [chosen, rejected] of every pair under the current weights."""
    device, compute_dtype = _device_and_dtype(model, compute_dtype)
    out = torch.zeros(len(examples), 2)
    shared_prefix = shares_prefix(train, device)
    batches = length_grouped_batches([e.n_tokens for e in examples], train.batch_size * 2, seed=0)
    batches = [b for group in batches for b in _micro_batches(examples, [group], train, shared_prefix)]
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with adapter_off, progress_bar("reference log-probs", len(examples)) as bar:
        for indices in [batches[k] for k in distributed.mine(len(batches))]:  # batch k to process k % W
            batch = _to(_collate(model, [examples[i] for i in indices], pad_id, shared_prefix,
                                 packs(train, shared_prefix)), device)
            with autocast(device, compute_dtype):
                logps = _batch_logps(model, batch, loss, train.logits_chunk).cpu()
            out[indices, 0], out[indices, 1] = logps[:len(indices)], logps[len(indices):]
            bar.advance(len(indices))
    model.train(was_training)
    return distributed.all_sum(out)  # each row was filled by exactly one process


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """The fused AdamW kernel (one launch for all tensors) exists for float params on CPU and CUDA."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
               for p in params)


def _tokenize(tokenizer, pairs: list[PreferencePair], train: TrainSettings, data: DataSettings, length_unit: str):
    return tokenize_pairs(tokenizer, pairs, max_length=train.max_length, max_prompt_length=train.max_prompt_length,
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


SATURATED_LOGITS = 3.0  # sigmoid(3) = 0.95: past this the length term decides the pair's gradient


# --- divergence ----------------------------------------------------------------------------------


class DivergenceGuard:
    """Stops a round before a diverged model can be saved. After optimizer step s:

    - the loss, the gradient norm or any trainable weight is not finite;
    - the loss exceeds LOSS_FACTOR x max(median of the last WINDOW steps' losses, the step's loss at
      the reference (its pairs' loss with a zero log-ratio margin: under IPO a pair whose length
      term raises its target starts high, and a batch of them after easy ones is no divergence), 1), or the
      gradient norm (before clipping) exceeds GRAD_FACTOR x max(their median, the clipping norm:
      saturated pairs give near-zero gradients, and one unsaturated pair must not look like an
      explosion against them); both from step
      MIN_HISTORY + 1 on, so a round's first noisy steps set the history;
    - the trainable weights' norm moved by more than DRIFT x its starting value: fine-tuning
      moves weights by a small fraction of their size, a diverged step by orders of magnitude.

    The factors are loose on purpose: a false alarm costs a whole round, a miss costs a model.
    """

    WINDOW, MIN_HISTORY = 20, 5
    LOSS_FACTOR, GRAD_FACTOR, DRIFT = 20.0, 100.0, 1.0

    def __init__(self, params: list[torch.nn.Parameter], loss_scaling: bool = False, grad_floor: float = 1.0,
                 sharded: bool = False) -> None:
        self.grad_floor = grad_floor
        self.params = params
        self.sharded = sharded  # FSDP: each process holds a shard of every weight
        self.loss_scaling = loss_scaling  # float16: an overflowing step is skipped by the scaler
        self.start_norm = self._norm()
        self.losses: list[float] = []
        self.grads: list[float] = []

    def _norm(self) -> float:
        if self.sharded:
            return distributed.sharded_norm(self.params)
        with torch.no_grad():
            return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
                [p.detach().float() for p in self.params]))))

    @staticmethod
    def stop(step: int, what: str) -> None:
        raise TrainingDiverged(f"training diverged at step {step}: {what}; stopped before saving, "
                               "the last good model is kept (lower train.learning_rate)")

    def check_loss(self, step: int, loss: float) -> None:
        """Before the optimizer step: a non-finite loss never reaches the weights."""
        if not math.isfinite(loss):
            self.stop(step, f"non-finite loss ({loss})")

    def check(self, step: int, loss: float, grad_norm: float, loss_at_reference: float = 0.0) -> None:
        """After the optimizer step."""
        def stop(what: str) -> None:
            self.stop(step, what)

        if not math.isfinite(grad_norm):
            if self.loss_scaling:
                return  # the scaler skipped this step and lowers its scale
            stop(f"non-finite gradient norm ({grad_norm})")
        if len(self.losses) >= self.MIN_HISTORY:
            median = max(statistics.median(self.losses[-self.WINDOW:]), 1.0)
            loss_ref = max(median, loss_at_reference)
            if loss > self.LOSS_FACTOR * loss_ref:
                what = "recent median" if loss_ref == median else "its loss at the reference"
                stop(f"loss {loss:.4g} > {self.LOSS_FACTOR:g} x {loss_ref:.4g} ({what})")
            grad_ref = max(statistics.median(self.grads[-self.WINDOW:]), self.grad_floor)
            if grad_norm > self.GRAD_FACTOR * grad_ref:
                stop(f"gradient norm {grad_norm:.4g} > {self.GRAD_FACTOR:g} x {grad_ref:.4g} (recent median)")
        norm = self._norm()
        if not math.isfinite(norm):
            stop("non-finite weights")
        if abs(norm - self.start_norm) > self.DRIFT * self.start_norm:
            stop(f"weight norm {norm:.4g} moved more than {self.DRIFT:g} x its start {self.start_norm:.4g}")
        self.losses.append(loss)
        self.grads.append(grad_norm)


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
    engine: object = None  # a DeepSpeed ZeRO engine (zero.py) that owns the backward and the step


def _setup(model, examples, train: TrainSettings, seed: int, device, compute_dtype) -> RoundSetup:
    """Optimizer, learning-rate schedule, loss scaler and the micro-batch order of all epochs."""
    if train.gradient_checkpointing or distributed.fsdp_activation_checkpointing():
        # after the reference pass: checkpointing is train-only
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if distributed.fsdp_requested():  # after the reference pass, which every process runs on whole weights
        distributed.shard(model, compute_dtype)  # (float16 is refused up front, preflight.check_config)
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = distributed.is_sharded(model) or zero.requested()
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay,
                                  fused=_fused_ok(params) and not sharded)
    n_batches = math.ceil(len(examples) / train.batch_size)
    total_micro = max(1, math.ceil(train.epochs * n_batches))
    total_steps = math.ceil(total_micro / train.grad_accum)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler,
        optimizer, num_warmup_steps=int(train.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    # float16 has too few exponent bits for small gradients: scale the loss (bfloat16 does not need it).
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    schedule = _schedule(total_micro, train.batch_size, [e.n_tokens for e in examples], seed)
    # DeepSpeed takes the model and its AdamW after the reference pass, like FSDP; the schedule stays ours
    engine = zero.initialize(model, optimizer, train.max_grad_norm, compute_dtype) if zero.requested() else None
    return RoundSetup(examples, params, optimizer, scheduler, scaler, schedule, total_steps, n_batches, engine)


def _resume_metrics(partial: Path, final: Path, step: int) -> None:
    """The metrics file of a resumed round: the lines of steps 1..step, from where they are."""
    source = partial if partial.exists() else final
    rows = [r for r in read_jsonl_tolerant(source) if r.get("step", 0) <= step]
    write_jsonl(partial, rows)


def train_round(model, tokenizer, pairs: list[PreferencePair], *, loss: LossSettings, train: TrainSettings,
                data: DataSettings, output_dir: str | Path, seed: int = 0,
                ref_logps: torch.Tensor | None = None, ref_adapter_disabled: bool = False,
                hparams: dict | None = None, compute_dtype: torch.dtype | None = None,
                checkpoint_dir: str | Path | None = None, run_name: str | None = None,
                tracker: RunTracker | None = None, step_offset: int = 0) -> TrainResult:
    """Train `model` in place for train.epochs over `pairs`; metrics to output_dir/metrics.jsonl
    (written as metrics.partial.jsonl while the round runs, renamed when it ends well).

    ref_logps: precomputed (P, 2) reference log-probs (e.g. from the initial model); by default
    they are computed here from the model before its first update. compute_dtype: the autocast
    dtype (default: the weights' dtype). checkpoint_dir: where a checkpoint is kept every
    train.save_steps steps; a valid one found there is resumed from. tracker: the run's tracker
    (ilrdpo.tracking), steps logged at step_offset + step; without one, train.report_to opens a
    tracker run for this round alone.
    """
    if not pairs:
        raise UserInputError("no preference pairs to train on")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device, compute_dtype = _device_and_dtype(model, compute_dtype)
    metrics_path, partial_path = output_dir / "metrics.jsonl", output_dir / "metrics.partial.jsonl"
    checkpoints = Checkpointer(None if checkpoint_dir is None else Path(checkpoint_dir),
                               round_fingerprint(pairs, loss, train, seed), train.save_steps)
    torch.manual_seed(seed)

    # 1. tokenise
    examples = _tokenize(tokenizer, pairs, train, data, loss.length_unit)
    n_truncated = sum(e.truncated for e in examples)
    if n_truncated:
        console.print(f"[yellow]{n_truncated} of {len(examples)} pairs truncated to "
                      f"train.max_length={train.max_length}[/yellow]")

    # 2. reference log-probs, before any update (the weights must still be pi_ref's); a resumed
    #    round takes them from its checkpoint, since the weights have moved since.
    resumed = checkpoints.load()
    if resumed is not None:
        ref_logps = resumed["ref_logps"]
    elif loss.type not in REFERENCE_FREE and ref_logps is None:
        ref_logps = reference_logps(model, examples, tokenizer.pad_token_id, loss, train, ref_adapter_disabled,
                                    compute_dtype)

    # 3. optimizer and schedule
    setup = _setup(model, examples, train, seed, device, compute_dtype)
    start_step, tokens = 0, 0
    if resumed is not None:
        checkpoints.restore(resumed, model, setup.optimizer, setup.scheduler, setup.scaler)
        start_step, tokens = resumed["step"], resumed["tokens"]
        _resume_metrics(partial_path, metrics_path, start_step)
        console.print(f"resuming training from the checkpoint at step {start_step}")
    elif distributed.is_main():
        partial_path.unlink(missing_ok=True)

    # 4. the loop
    own = tracker is None
    if own:
        tracker = RunTracker(train.report_to, output_dir, hparams or {}, project=train.project,
                             run_name=run_name or train.run_name)
    try:
        result = _run_steps(model, setup, tokenizer.pad_token_id, loss, train, ref_logps, compute_dtype, device,
                            start_step, tokens, partial_path, checkpoints, tracker, step_offset)
    finally:
        if own:
            tracker.finish()
    if distributed.is_main():
        os.replace(partial_path, metrics_path)
        fault_point(metrics_path.name)
    checkpoints.remove()
    result.n_truncated, result.resumed_from = n_truncated, start_step
    result.ref_logps = None if ref_logps is None else ref_logps.tolist()
    return result


def _run_steps(model, setup: RoundSetup, pad_id: int, loss: LossSettings, train: TrainSettings, ref_logps,
               compute_dtype, device, start_step: int, tokens: int, metrics_path: Path,
               checkpoints: Checkpointer, tracker: RunTracker, step_offset: int) -> TrainResult:
    """Optimizer steps start_step+1 .. total_steps; one metrics line each."""
    model.train()
    sharded = distributed.is_sharded(model)
    guard = DivergenceGuard(setup.params, loss_scaling=setup.scaler.is_enabled(), grad_floor=train.max_grad_norm,
                            sharded=sharded)
    shared_prefix = shares_prefix(train, device)
    backward = functools.partial(_backward, setup=setup, lockstep=sharded)
    start, record = time.perf_counter(), {}
    with progress_bar("training", setup.total_steps) as bar:
        bar.advance(start_step)
        for step in range(start_step + 1, setup.total_steps + 1):
            group = setup.schedule[(step - 1) * train.grad_accum:step * train.grad_accum]
            group = _micro_batches(setup.examples, group, train, shared_prefix)
            n_in_step = sum(len(ix) for ix in group)
            sums = dict.fromkeys(STATS, 0.0)
            step_tokens = 0
            for group_indices in group:
                # several processes: each takes its share of every micro-batch (the same number of
                # micro-batches per step in each), weighted by the step's global pair count
                indices = group_indices[distributed.rank()::distributed.world_size()]
                share = len(indices) / n_in_step
                if not indices:
                    if not sharded:
                        continue
                    indices = group_indices[:1]  # FSDP runs in lockstep: a pass that adds nothing
                batch = _to(_collate(model, [setup.examples[i] for i in indices], pad_id, shared_prefix,
                                     packs(train, shared_prefix)), device)
                with autocast(device, compute_dtype):
                    policy = _batch_logps(model, batch, loss, train.logits_chunk)  # (2B,)
                # FSDP and ZeRO average the gradients over processes; the shares already sum to 1 over them
                weight = share * (distributed.world_size() if sharded else 1)
                stats = _micro_step(policy, batch, ref_logps, indices, loss, weight, backward)
                if share:
                    for key in STATS:
                        sums[key] += stats[key] * share
                    step_tokens += sum(setup.examples[i].n_tokens for i in indices)
            if distributed.world_size() > 1:
                totals = distributed.all_sum(torch.tensor([*sums.values(), step_tokens], dtype=torch.float64))
                sums, step_tokens = dict(zip(STATS, totals[:-1].tolist())), int(totals[-1])
                if not sharded:  # FSDP and ZeRO have reduced them already
                    distributed.sum_gradients(setup.params)
            tokens += step_tokens
            guard.check_loss(step, sums["loss"])
            learning_rate = setup.scheduler.get_last_lr()[0]  # the rate this step used
            if setup.engine is not None:  # it clips, steps and zeroes the gradients
                grad_norm = zero.step(setup.engine)
            else:
                grad_norm = _optimizer_step(setup, train.max_grad_norm)
            setup.scheduler.step()
            guard.check(step, sums["loss"], grad_norm, sums["loss/at_reference"])
            record = {"step": step, "epoch": round((step - 1) * train.grad_accum / max(setup.n_batches, 1), 4),
                      **sums, "grad_norm": grad_norm, "learning_rate": learning_rate,
                      "tokens": tokens, "elapsed_s": round(time.perf_counter() - start, 3)}
            append_jsonl(metrics_path, record)
            tracker.log_train(record, step_offset + step)
            checkpoints.save(step, model, setup.optimizer, setup.scheduler, setup.scaler, ref_logps, tokens)
            bar.advance(1, loss=f"{sums['loss']:.4f}", acc=f"{sums['rewards/accuracies']:.2f}")
    if train.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    elapsed = time.perf_counter() - start
    return TrainResult(steps=setup.total_steps, n_pairs=len(setup.examples), n_truncated=0,
                       tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0, final=record)


def _backward(losses: torch.Tensor, weight: float, setup: RoundSetup, lockstep: bool) -> None:
    """The backward of a micro-batch's weighted mean loss. A non-finite loss stops the round before
    the step (DivergenceGuard.check_loss): it never reaches the gradients, but under FSDP and ZeRO
    the process still runs a zero backward, since the others' collectives wait for its own."""
    finite = bool(torch.isfinite(losses).all())
    if not finite and not lockstep:
        return
    loss = losses.mean() * weight if finite else losses.nan_to_num(0.0, 0.0, 0.0).mean() * 0.0
    if setup.engine is not None:
        zero.backward(setup.engine, loss)
    else:
        setup.scaler.scale(loss).backward()


def _optimizer_step(setup: RoundSetup, max_grad_norm: float) -> float:
    """Unscale (float16), clip, step; the gradient norm before clipping."""
    setup.scaler.unscale_(setup.optimizer)
    grad_norm = float(distributed.full_value(torch.nn.utils.clip_grad_norm_(setup.params, max_grad_norm)))
    setup.scaler.step(setup.optimizer)
    setup.scaler.update()
    setup.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def loss_at_reference(length_term: torch.Tensor, loss: LossSettings) -> torch.Tensor:
    """(B,) each pair's loss with a zero log-ratio margin (policy = reference; SimPO: equal average
    log-probs), where only the length term (and SimPO's gamma) is left."""
    margin = length_term.float() - (loss.simpo_gamma if loss.type == "simpo" else 0.0)
    return LOSSES[loss.type].fn(margin, loss.beta, loss.label_smoothing)


STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected", "length/chosen", "length/rejected", "length/margin_term", "length/saturated_share",
         "length/reversed_share", "loss/at_reference")


def _micro_step(policy: torch.Tensor, batch: dict[str, torch.Tensor], ref_logps: torch.Tensor | None,
                indices: list[int], loss: LossSettings, weight: float, backward) -> dict[str, float]:
    """Loss and backward of one micro-batch; returns its metrics (means over its pairs)."""
    n = len(indices)
    lengths, n_tokens = batch["lengths"], batch["n_tokens"]
    ref = ref_logps[indices].to(policy.device) if ref_logps is not None else None  # (B, 2)
    target = batch.get("target_length", loss.target_length)
    out = preference_loss(
        policy[:n], policy[n:], None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
        lengths[:n], lengths[n:], loss_type=loss.type, beta=loss.beta, alpha=loss.alpha,
        target_length=target, label_smoothing=loss.label_smoothing, simpo_gamma=loss.simpo_gamma,
        chosen_n_tokens=n_tokens[:n], rejected_n_tokens=n_tokens[n:], no_reversal=loss.no_reversal,
    )
    backward(out.losses, weight)
    return {
        "loss": out.losses.mean().item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        "rewards/accuracies": pair_accuracy(out.chosen_rewards, out.rejected_rewards).mean().item(),
        "logps/chosen": policy[:n].mean().item(),
        "logps/rejected": policy[n:].mean().item(),
        "length/chosen": lengths[:n].mean().item(),
        "length/rejected": lengths[n:].mean().item(),
        "length/margin_term": out.length_term.mean().item(),
        # pairs whose length term alone puts the loss in the sigmoid's flat tails (|term| > 3 logits)
        "length/saturated_share": (out.length_term.abs() > SATURATED_LOGITS).float().mean().item(),
        # pairs the loss learns the other way round (IPO, cDPO: the length term exceeds the target margin)
        "length/reversed_share": length_reversed(out.length_term, loss.type,
                                                 loss.label_smoothing).float().mean().item(),
        # the loss these pairs have where the policy equals the reference (their log-ratio margin 0):
        # the scale of a healthy loss for the divergence guard; with a target margin (IPO) it grows
        # with each pair's length term
        "loss/at_reference": loss_at_reference(out.length_term, loss).mean().item(),
    }

"""One round of preference training (LR-DPO and its loss family) on a list of pairs.

Order of work:
  1. tokenise the pairs (prompt via chat template, answers appended as ids) and truncate;
  2. reference log-probs, once, with the model as it is now (or its adapter disabled), before
     any update: pi_ref is this round's starting point, so no second model is held in memory;
  3. length-grouped micro-batches, chosen and rejected rows in one forward pass;
  4. AdamW, warmup then decay, gradient accumulation, clipping; one metrics line per step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ilrdpo.config import DataSettings, LossSettings, TrainSettings
from ilrdpo.data import TokenizedPair, collate_pairs, length_grouped_batches, tokenize_pairs
from ilrdpo.errors import TrainingDiverged, UserInputError
from ilrdpo.logprobs import ld_weights, sequence_logps
from ilrdpo.loss import REFERENCE_FREE, length_margin_term, preference_loss
from ilrdpo.progress import console, progress_bar
from ilrdpo.records import PreferencePair, append_jsonl


@dataclass
class TrainResult:
    steps: int
    n_pairs: int
    n_truncated: int
    tokens_per_s: float
    final: dict[str, float] = field(default_factory=dict)
    ref_logps: list[list[float]] | None = None  # (P, 2) [chosen, rejected], as used


def _autocast(device: torch.device, model_dtype: torch.dtype):
    if device.type == "cuda" and model_dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batch_logps(model, batch: dict[str, torch.Tensor], loss: LossSettings, chunk: int):
    mask = batch["response_mask"]
    if loss.type == "ld_dpo":
        mask = ld_weights(mask, mask.shape[0] // 2, loss.ld_alpha)
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], mask, chunk_size=chunk)
    return logps  # (2B,)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def reference_logps(model, examples: list[TokenizedPair], pad_id: int, loss: LossSettings,
                    train: TrainSettings, device: torch.device, disable_adapter: bool = False) -> torch.Tensor:
    """(P, 2) reference log-probs [chosen, rejected] of every pair under the current weights."""
    out = torch.zeros(len(examples), 2)
    batches = length_grouped_batches([e.n_tokens for e in examples], train.batch_size * 2, seed=0)
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    with adapter_off, progress_bar("reference log-probs", len(examples)) as bar:
        for indices in batches:
            batch = _to(collate_pairs([examples[i] for i in indices], pad_id), device)
            with _autocast(device, next(model.parameters()).dtype):
                logps = _batch_logps(model, batch, loss, train.logits_chunk).float().cpu()
            out[indices, 0], out[indices, 1] = logps[:len(indices)], logps[len(indices):]
            bar.advance(len(indices))
    model.train(was_training)
    return out


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """The fused AdamW kernel (one launch for all tensors) exists for float params on CPU and CUDA."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
               for p in params)


def _tokenize(tokenizer, pairs: list[PreferencePair], train: TrainSettings, data: DataSettings):
    return tokenize_pairs(tokenizer, pairs, max_length=train.max_length, max_prompt_length=train.max_prompt_length,
                          use_chat_template=data.use_chat_template, system_prompt=data.system_prompt)


def pair_reference_logps(model, tokenizer, pairs: list[PreferencePair], loss: LossSettings, train: TrainSettings,
                         data: DataSettings, disable_adapter: bool = False) -> torch.Tensor:
    """(P, 2) log-probs of the pairs under `model`, tokenised exactly as train_round does."""
    examples = _tokenize(tokenizer, pairs, train, data)
    device = next(model.parameters()).device
    return reference_logps(model, examples, tokenizer.pad_token_id, loss, train, device, disable_adapter)


def _schedule(total_micro: int, batch_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    """The micro-batches of all epochs in order; a fractional last epoch takes a prefix."""
    order: list[list[int]] = []
    epoch = 0
    while len(order) < total_micro:
        order.extend(length_grouped_batches(lengths, batch_size, seed + epoch))
        epoch += 1
    return order[:total_micro]


def _open_trackers(report_to: list[str], output_dir: Path, hparams: dict) -> list:
    """accelerate's trackers, used directly: an Accelerator would own global state per process."""
    if not report_to:
        return []
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    makers = {"tensorboard": lambda: TensorBoardTracker(output_dir.name, output_dir / "logs"),
              "wandb": lambda: WandBTracker(output_dir.name)}
    trackers = []
    for name in report_to:
        tracker = makers[name]()
        tracker.start()
        # hparams must be scalars for TensorBoard
        tracker.store_init_configuration({k: v for k, v in hparams.items()
                                          if isinstance(v, (int, float, str, bool))})
        trackers.append(tracker)
    return trackers


def train_round(model, tokenizer, pairs: list[PreferencePair], *, loss: LossSettings, train: TrainSettings,
                data: DataSettings, output_dir: str | Path, seed: int = 0,
                ref_logps: torch.Tensor | None = None, ref_adapter_disabled: bool = False,
                hparams: dict | None = None) -> TrainResult:
    """Train `model` in place for train.epochs over `pairs`; metrics to output_dir/metrics.jsonl.

    ref_logps: precomputed (P, 2) reference log-probs (e.g. from the initial model); by default
    they are computed here from the model before its first update.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    if not pairs:
        raise UserInputError("no preference pairs to train on")
    device = next(model.parameters()).device
    torch.manual_seed(seed)

    # 1. tokenise
    examples = _tokenize(tokenizer, pairs, train, data)
    n_truncated = sum(e.truncated for e in examples)
    if n_truncated:
        console.print(f"[yellow]{n_truncated} of {len(examples)} pairs truncated to "
                      f"train.max_length={train.max_length}[/yellow]")
    pad_id = tokenizer.pad_token_id

    # 2. reference log-probs, before any update (the weights must still be pi_ref's)
    needs_ref = loss.type not in REFERENCE_FREE
    if needs_ref and ref_logps is None:
        ref_logps = reference_logps(model, examples, pad_id, loss, train, device, ref_adapter_disabled)

    # 3. optimizer and schedule (after the reference pass: gradient checkpointing is train-only)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay,
                                  fused=_fused_ok(params))
    n_batches = math.ceil(len(examples) / train.batch_size)
    total_micro = max(1, math.ceil(train.epochs * n_batches))
    total_steps = math.ceil(total_micro / train.grad_accum)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        "constant_with_warmup" if train.lr_scheduler == "constant" else train.lr_scheduler,
        optimizer, num_warmup_steps=int(train.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    schedule = _schedule(total_micro, train.batch_size, [e.n_tokens for e in examples], seed)
    trackers = _open_trackers(train.report_to, output_dir, hparams or {})

    # 4. the loop
    model.train()
    model_dtype = next(model.parameters()).dtype
    tokens, start, step, record = 0, time.perf_counter(), 0, {}
    with progress_bar("training", total_steps) as bar:
        for first in range(0, len(schedule), train.grad_accum):
            group = schedule[first:first + train.grad_accum]
            n_in_step = sum(len(ix) for ix in group)
            sums: dict[str, float] = {}
            for indices in group:
                batch = _to(collate_pairs([examples[i] for i in indices], pad_id, loss.length_unit), device)
                with _autocast(device, model_dtype):
                    policy = _batch_logps(model, batch, loss, train.logits_chunk)  # (2B,)
                stats = _micro_step(policy, batch, ref_logps, indices, loss, weight=len(indices) / n_in_step,
                                    step=step + 1)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value * len(indices) / n_in_step
                tokens += sum(examples[i].n_tokens for i in indices)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            record = {"step": step, "epoch": round(first / max(n_batches, 1), 4), **sums,
                      "grad_norm": float(grad_norm), "learning_rate": learning_rate,
                      "tokens": tokens, "elapsed_s": round(time.perf_counter() - start, 3)}
            append_jsonl(metrics_path, record)
            for tracker in trackers:
                tracker.log(record, step=step)
            bar.advance(1, loss=f"{sums['loss']:.4f}", acc=f"{sums['rewards/accuracies']:.2f}")
    for tracker in trackers:
        tracker.finish()
    if train.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    elapsed = time.perf_counter() - start
    return TrainResult(steps=step, n_pairs=len(examples), n_truncated=n_truncated,
                       tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0, final=record,
                       ref_logps=None if ref_logps is None else ref_logps.tolist())


def _micro_step(policy: torch.Tensor, batch: dict[str, torch.Tensor], ref_logps: torch.Tensor | None,
                indices: list[int], loss: LossSettings, weight: float, step: int) -> dict[str, float]:
    """Loss and backward of one micro-batch; returns its metrics (means over its pairs)."""
    n = len(indices)
    lengths, n_tokens = batch["lengths"], batch["n_tokens"]
    ref = ref_logps[indices].to(policy.device) if ref_logps is not None else None  # (B, 2)
    target = batch.get("target_length", loss.target_length)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy[:n], policy[n:], None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
        lengths[:n], lengths[n:], loss_type=loss.type, beta=loss.beta, alpha=loss.alpha,
        target_length=target, label_smoothing=loss.label_smoothing, simpo_gamma=loss.simpo_gamma,
        chosen_n_tokens=n_tokens[:n], rejected_n_tokens=n_tokens[n:],
    )
    if not torch.isfinite(losses).all():
        raise TrainingDiverged(f"non-finite loss at step {step}; training stopped, the last saved model is kept")
    (losses.mean() * weight).backward()
    margin_term = length_margin_term(lengths[:n], lengths[n:], loss.alpha, target)
    return {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": policy[:n].mean().item(),
        "logps/rejected": policy[n:].mean().item(),
        "length/chosen": lengths[:n].mean().item(),
        "length/rejected": lengths[n:].mean().item(),
        "length/margin_term": margin_term.mean().item(),
    }

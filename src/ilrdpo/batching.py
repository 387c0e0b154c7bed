"""How a round's pairs become micro-batches and log-probs, for the reference pass and the
training steps alike: [chosen; rejected] rows, or where prefix sharing wins (PREFIX_SHARING) one
row per pair (prompt computed once, logprobs.shared_prefix_logps); with train.max_tokens_per_batch
each step's pairs re-split into micro-batches of at most that many positions."""

from __future__ import annotations

import contextlib

import torch

from ilrdpo.config import LossSettings, TrainSettings
from ilrdpo.data import TokenizedPair, collate_pairs, collate_shared_prefix, split_by_token_budget
from ilrdpo.logprobs import ld_weights, sequence_logps, shared_prefix_logps, shared_prefix_supported


def autocast(device: torch.device, compute_dtype: torch.dtype):
    """Autocast to the compute dtype when it is a half type, on CPU and CUDA alike."""
    if compute_dtype in (torch.bfloat16, torch.float16) and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=compute_dtype)
    return contextlib.nullcontext()


# One row per pair (prompt computed once) where it was measured to win: on CPU it is faster and
# smaller (benchmarks/README.md); on CUDA the two-row layout stays until a measurement says
# otherwise. Same log-probs and gradients either way (tests/test_train.py); the benchmark and the
# tests set an entry to compare the layouts.
PREFIX_SHARING = {"cpu": True, "cuda": False}
# Answer positions per chunk of the log-prob head (bounds the (positions, vocabulary) logits).
LOGITS_CHUNK = 1024


def shares_prefix(device: torch.device) -> bool:
    """Whether pairs share their prompt's row on this device (PREFIX_SHARING)."""
    return PREFIX_SHARING.get(device.type, False)


def collate(model, examples: list[TokenizedPair], pad_id: int, shared_prefix: bool) -> dict[str, torch.Tensor]:
    """The prefix-shared layout where it is exact for this model and width, else [chosen; rejected] rows."""
    if shared_prefix:
        width = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
        if shared_prefix_supported(model, width):
            return collate_shared_prefix(examples, pad_id)
    return collate_pairs(examples, pad_id)


def micro_batches(examples: list[TokenizedPair], batches: list[list[int]], train: TrainSettings,
                  shared_prefix: bool) -> list[list[int]]:
    """The pairs of `batches`, re-split to train.max_tokens_per_batch positions when it is set."""
    if train.max_tokens_per_batch is None:
        return batches
    return split_by_token_budget(examples, [i for b in batches for i in b], shared_prefix,
                                 train.max_tokens_per_batch)


def batch_logps(model, batch: dict[str, torch.Tensor], loss: LossSettings, chunk: int = LOGITS_CHUNK) -> torch.Tensor:
    """(2B,) log-probs of a collated batch's answers, chosen first (LD-DPO: its weighted form)."""
    if "segments" in batch:
        ld_alpha = loss.ld_alpha if loss.type == "ld_dpo" else None
        return shared_prefix_logps(model, batch, ld_alpha=ld_alpha, chunk_size=chunk)[0]  # (2B,)
    mask = batch["response_mask"]
    if loss.type == "ld_dpo":
        mask = ld_weights(mask, mask.shape[0] // 2, loss.ld_alpha)
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], mask, chunk_size=chunk)
    return logps.float()  # (2B,)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def device_and_dtype(model, compute_dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    first = next(model.parameters())
    return first.device, compute_dtype or first.dtype

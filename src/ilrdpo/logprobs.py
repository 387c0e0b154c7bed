"""Sequence log-probabilities of answer tokens: exact, padding-safe and memory-efficient.

The answer tokens are few next to the prompt and padding, and the vocabulary is large, so the
output head runs only at answer positions, in chunks, with the log-softmax in float32. When the
answer positions' float32 logits would exceed HEAD_MEMORY_BUDGET, each chunk is recomputed in
the backward pass instead of stored, so peak memory for the head is one chunk's logits; never
the float32 (batch, seq, vocab) log-softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

# Architectures whose logits are exactly lm_head(final hidden state): no soft-capping or logit
# scaling after the head. Others take the general path through model(...).logits.
PLAIN_HEAD_MODEL_TYPES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo",
    "olmo2", "smollm3", "gemma", "starcoder2", "stablelm", "gpt_neox",
}


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions count real tokens only, so a left-padded row starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (its LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# Below this many bytes of float32 head logits (answer positions x vocabulary), keep them for the
# backward pass; above it, recompute each chunk in backward instead (activation checkpointing).
HEAD_MEMORY_BUDGET = 512 * 2**20


def _token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    # log softmax(logits)[target] = -cross_entropy: one fused kernel, no (n, V) log-softmax kept.
    return -F.cross_entropy(logits.float(), targets, reduction="none")  # (n,)


def _head_token_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return _token_logps(head(hidden), targets)


def _answer_hidden_or_logits(model, input_ids, attention_mask, selected):
    """Hidden states (plain head) or logits at the positions that predict answer tokens."""
    lm = causal_lm(model)
    position_ids = position_ids_from_mask(attention_mask)
    if getattr(lm.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES:
        out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False)
        return out.last_hidden_state[:, :-1][selected], lm.get_output_embeddings()  # (N, H)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False).logits  # (B, T, V)
    return logits[:, :-1][selected], None  # (N, V)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Sum of log pi(token) over answer tokens, per row.

    Args:
        input_ids, attention_mask: (B, T), right or left padded.
        response_mask: (B, T), nonzero on answer tokens of input_ids. A float mask weights
            tokens (LD-DPO); the sum is then sum_t w_t log pi(y_t | y_<t, x).
        chunk_size: answer positions per head chunk.

    Returns (sum_logps, n_tokens): float32 (B,) and int64 (B,), n_tokens counting nonzero
    mask entries.
    """
    weights = response_mask[:, 1:].float()  # (B, T-1): token t+1 is predicted at position t
    selected = weights != 0
    targets = input_ids[:, 1:][selected]  # (N,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(selected)[selected]
    states, head = _answer_hidden_or_logits(model, input_ids, attention_mask, selected)

    recompute = head is not None and torch.is_grad_enabled() and \
        targets.shape[0] * head.weight.shape[0] * 4 > HEAD_MEMORY_BUDGET
    pieces = []
    for start in range(0, targets.shape[0], chunk_size):
        chunk, chunk_targets = states[start:start + chunk_size], targets[start:start + chunk_size]
        if head is None:
            pieces.append(_token_logps(chunk, chunk_targets))
        elif recompute:
            pieces.append(checkpoint(_head_token_logps, head, chunk, chunk_targets, use_reentrant=False))
        else:
            pieces.append(_head_token_logps(head, chunk, chunk_targets))
    token_logps = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)  # (N,)

    sum_logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sum_logps = sum_logps.index_add(0, rows, token_logps * weights[selected])  # (B,)
    return sum_logps, selected.sum(-1)


def ld_weights(response_mask: Tensor, n_pairs: int, ld_alpha: float) -> Tensor:
    """LD-DPO token weights for a batch of [chosen rows; rejected rows]: 1 up to the shorter
    answer's length in each pair, ld_alpha past it (Liu et al. 2024, arXiv 2409.06411)."""
    counts = response_mask.sum(-1)  # (2P,)
    shared = torch.minimum(counts[:n_pairs], counts[n_pairs:]).repeat(2)  # (2P,)
    index_in_answer = response_mask.cumsum(-1)  # (2P, T), 1-based on answer tokens
    inside = index_in_answer <= shared[:, None]
    return response_mask.float() * torch.where(inside, 1.0, ld_alpha)

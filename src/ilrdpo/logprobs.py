"""Sequence log-probabilities of answer tokens: exact, padding-safe and memory-efficient.

The answer tokens are few next to the prompt and padding, and the vocabulary is large, so the
output head runs only at answer positions, in chunks, with the log-softmax in float32; backward
keeps each chunk's logits in the compute dtype (bfloat16 on a GPU), not a float32 log-softmax.
When the answer positions' float32 logits would exceed head_memory_budget (512 MiB on CPU, a
tenth of a GPU's memory), each chunk is recomputed in the backward pass instead of stored, so
peak memory for the head is one chunk's logits; never the float32 (batch, seq, vocab) log-softmax.
"""

from __future__ import annotations

import torch
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
CUDA_HEAD_MEMORY_SHARE = 0.1  # on a GPU: this share of its memory (H200: ~14 GB; 0.5B shape, batch 16: ~4.4 GB)


def head_memory_budget(device: torch.device) -> int:
    """Bytes of head logits kept for backward on `device`: HEAD_MEMORY_BUDGET on CPU; a share of
    the GPU's memory on CUDA, where a recomputed head adds one more head forward to every step
    (not yet measured on a GPU: none was lent when this was written)."""
    if device.type == "cuda":
        return max(HEAD_MEMORY_BUDGET, int(CUDA_HEAD_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory))
    return HEAD_MEMORY_BUDGET


class _TargetLogps(torch.autograd.Function):
    """log softmax(logits)[target] per row, in float32, keeping for backward the logits in their
    own dtype and the (n,) float32 log-normaliser: under bfloat16 autocast half the bytes of the
    float32 log-softmax that cross_entropy keeps, for the same arithmetic (the softmax is rebuilt
    from the same logits in backward)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        log_norm = torch.logsumexp(logits.float(), dim=-1)  # (n,)
        ctx.save_for_backward(logits, targets, log_norm)
        return logits.gather(-1, targets[:, None])[:, 0].float() - log_norm  # (n,)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, log_norm = ctx.saved_tensors
        grad_logits = torch.exp(logits.float() - log_norm[:, None]).mul_(-grad[:, None])  # (n, V) = -g softmax
        grad_logits.scatter_add_(-1, targets[:, None], grad[:, None])  # + g at the target
        return grad_logits.to(logits.dtype), None


def _token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    return _TargetLogps.apply(logits, targets)  # (n,)


def _head_token_logps(head: torch.nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return _token_logps(head(hidden), targets)


def _states_at(model, input_ids, attention_mask, position_ids, predictors):
    """Hidden states (plain head) or logits at the flat positions `predictors` (N,) of (B, T)."""
    lm = causal_lm(model)
    if getattr(lm.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES:
        out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False)
        return out.last_hidden_state.flatten(0, 1)[predictors], lm.get_output_embeddings()  # (N, H)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, use_cache=False).logits  # (B, T, V)
    return logits.flatten(0, 1)[predictors], None  # (N, V)


def _summed_logps(states: Tensor, head, targets: Tensor, rows: Tensor, weights: Tensor, n_rows: int,
                  chunk_size: int) -> Tensor:
    """sum_t w_t log pi(target_t) per output row, the head run on `states` (N, H) in chunks."""
    recompute = head is not None and torch.is_grad_enabled() and \
        targets.shape[0] * getattr(head.weight, "ds_shape", head.weight.shape)[0] * 4 > \
        head_memory_budget(targets.device)  # (ds_shape: a ZeRO-3 partitioned weight's whole shape)
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
    sum_logps = torch.zeros(n_rows, dtype=torch.float32, device=targets.device)
    return sum_logps.index_add(0, rows, token_logps * weights)  # (n_rows,)


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

    Returns (sum_logps, scored_tokens): float32 (B,) and int64 (B,), scored_tokens counting
    nonzero mask entries (an answer's tokens as trained, EOS included: not data.count_tokens).
    """
    weights = response_mask[:, 1:].float()  # (B, T-1): token t+1 is predicted at position t
    selected = weights != 0
    rows, positions = selected.nonzero(as_tuple=True)  # (N,) each, row-major
    targets = input_ids[rows, positions + 1]  # (N,)
    states, head = _states_at(model, input_ids, attention_mask, position_ids_from_mask(attention_mask),
                              rows * input_ids.shape[1] + positions)
    sum_logps = _summed_logps(states, head, targets, rows, weights[rows, positions], input_ids.shape[0],
                              chunk_size)
    return sum_logps, selected.sum(-1)


# --- prefix sharing ------------------------------------------------------------------------------
# One row per pair, prompt + chosen + rejected, with a 4D attention mask in which rejected tokens
# see the prompt but not the chosen answer, and positions restart after the prompt: the prompt is
# computed once for both answers (Wang and Hegde 2024, arXiv 2410.20305). Exact: every answer
# token sees what it sees in its own row (transformers returns a 4D mask as given).

PROMPT, CHOSEN, REJECTED = 1, 2, 3  # segment ids; 0 is padding
SHARED_PREFIX_ATTENTION = {"sdpa", "eager"}  # implementations that take an arbitrary 4D mask


def shared_prefix_supported(model, width: int) -> bool:
    """Whether the prefix-shared layout is exact for this model at this row width: its attention takes
    a 4D mask, and no sliding window is shorter than the row (a 4D mask replaces the window)."""
    config = causal_lm(model).config
    window = getattr(config, "sliding_window", None)
    return getattr(config, "_attn_implementation", None) in SHARED_PREFIX_ATTENTION and \
        (not window or width <= window)


def shared_prefix_mask(segments: Tensor, attn_implementation: str) -> Tensor:
    """(B, 1, T, T) mask of the prefix-shared layout: causal, keys in the prompt or in the query's
    own answer. Padding queries see themselves only, so no row is all masked (NaN in SDPA)."""
    width = segments.shape[1]
    query, key = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (query != 0) & (key != 0) & ((key == PROMPT) | (key == query))  # (B, T, T)
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    if attn_implementation == "eager":  # eager adds the mask to the scores
        return torch.zeros(allowed.shape, device=segments.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)[:, None]
    return allowed[:, None]


def shared_prefix_logps(model: torch.nn.Module, batch: dict[str, Tensor], *, ld_alpha: float | None = None,
                        chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Summed answer log-probs of a prefix-shared batch (data.collate_shared_prefix): (2P,) float32
    [chosen rows; rejected rows] and (2P,) int64 token counts, as sequence_logps gives for the
    same pairs in [chosen; rejected] rows. ld_alpha: LD-DPO weights as ld_weights sets them."""
    input_ids, rows = batch["input_ids"], batch["answer_row"]  # (R, T), (N,)
    n_rows = batch["lengths"].shape[0]  # 2P output rows of the P pairs
    weights = torch.ones(rows.shape, dtype=torch.float32, device=rows.device)  # (N,)
    if ld_alpha is not None:
        answer_lens = batch["scored_tokens"]  # (2P,) answer tokens, as ld_weights counts them
        shared = torch.minimum(answer_lens[:n_rows // 2], answer_lens[n_rows // 2:]).repeat(2)  # (2P,)
        weights = torch.where(batch["answer_index"] <= shared[rows], 1.0, ld_alpha)
    attention = getattr(causal_lm(model).config, "_attn_implementation", "sdpa")
    mask = shared_prefix_mask(batch["segments"], attention)
    states, head = _states_at(model, input_ids, mask, batch["position_ids"], batch["predictor"])
    targets = input_ids.flatten()[batch["answer_position"]]  # (N,)
    return _summed_logps(states, head, targets, rows, weights, n_rows, chunk_size), \
        torch.bincount(rows, minlength=n_rows)


def ld_weights(response_mask: Tensor, n_pairs: int, ld_alpha: float) -> Tensor:
    """LD-DPO token weights for a batch of [chosen rows; rejected rows]: 1 up to the shorter
    answer's length in each pair, ld_alpha past it (Liu et al. 2024, arXiv 2409.06411)."""
    counts = response_mask.sum(-1)  # (2P,)
    shared = torch.minimum(counts[:n_pairs], counts[n_pairs:]).repeat(2)  # (2P,)
    index_in_answer = response_mask.cumsum(-1)  # (2P, T), 1-based on answer tokens
    inside = index_in_answer <= shared[:, None]
    return response_mask.float() * torch.where(inside, 1.0, ld_alpha)


@torch.no_grad()
def sliding_window_logprob(model, input_ids: Tensor, window: int, stride: int, first: int = 1) -> tuple[float, int]:
    """Log-likelihood of a text longer than the context: (sum of token log-probs, tokens scored).

    Targets are taken `stride` at a time; each group is scored in one forward pass over the up to
    `window` tokens that end with it, so every token after the first is scored exactly once
    (length - 1 of them) with at least window - stride tokens of context (all of it near the
    start). When the text fits one window this is the plain log-likelihood. input_ids: (T,) or
    (1, T); 0 < stride < window. first: the first target position (1: the whole text; the length
    of a prompt: its answer alone, every answer token with the prompt as context where it fits).
    """
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window, got stride={stride}, window={window}")
    ids = input_ids.reshape(-1)  # (T,)
    device = next(model.parameters()).device
    total = 0.0
    for start in range(max(first, 1), len(ids), stride):  # targets [start, stop)
        stop = min(start + stride, len(ids))
        context = max(0, stop - window)
        chunk = ids[context:stop].unsqueeze(0).to(device)  # (1, <= window)
        logps = _token_logps(model(input_ids=chunk).logits[0, :-1], chunk[0, 1:])  # targets context+1 .. stop-1
        total += float(logps[start - context - 1:].double().sum())
    return total, max(len(ids) - max(first, 1), 0)

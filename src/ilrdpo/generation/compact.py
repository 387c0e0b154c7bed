"""A decoding loop that drops finished rows and shares each prompt's prefill among its N samples.

`model.generate` keeps every row of a batch until the longest answer ends, so a batch of 64
samples costs 64 rows for max(len) steps. Here finished rows leave the batch (and the KV cache)
once an eighth of it has finished (each drop copies the cache), and the prompt is prefilled once
and its cache repeated N times. Same sampling distribution as `generate`: the same logits
warpers, in the same order (temperature, top-k, top-p), sampling from the global torch generator, greedy = argmax. `sample_tokens` applies top-k
and top-p over the 256 most likely tokens instead of sorting the whole vocabulary every step (the
sort and the full-vocabulary multinomial were 40% of a CPU decoding step at 64 rows); rows whose
nucleus does not fit in that slice take transformers' warpers on the full vocabulary. The
distribution is the same, the random stream is not: seeded samples differ from `generate`'s.

Used on CPU; on a CUDA device `generation.backend: auto` keeps transformers' compiled
static-cache generate, which is what pays off there.
"""

from __future__ import annotations

import inspect

import torch

from ilrdpo.config import GenerationSettings


def warpers(settings: GenerationSettings):
    """transformers' sampling warpers in generate's order: temperature, top-k, top-p (the full-sort
    fallback, `_full`, and the reference the tests compare `nucleus` with)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    chain = LogitsProcessorList()
    if settings.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        chain.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        chain.append(TopPLogitsWarper(settings.top_p))
    return chain


SLICE = 256  # tokens looked at before falling back to a full sort


def _truncated(scores: torch.Tensor, settings: GenerationSettings):
    """(probs, ids, spill): temperature, top-k and top-p over scores (r, V) as probs (r, k) over
    token ids (r, k) (ids None: probs span the vocabulary), and the rows (or None) whose nucleus
    may reach past the slice, whose full distribution is `_full(scores[spill])`."""
    scores = scores.float() / settings.temperature if settings.temperature != 1.0 else scores.float()
    vocab = scores.shape[-1]
    if settings.top_k == 0 and settings.top_p >= 1.0:
        return torch.softmax(scores, -1), None, None
    width = min(settings.top_k or SLICE, vocab)
    top, ids = scores.topk(width, dim=-1)  # (r, k), most likely first
    whole = settings.top_k > 0 or width == vocab  # the slice holds every token that can be kept
    probs = torch.softmax(top, -1) if whole else torch.exp(top - torch.logsumexp(scores, -1, keepdim=True))
    spill = None
    if settings.top_p < 1.0:
        keep = probs.cumsum(-1) - probs < settings.top_p  # mass of the more likely tokens below top_p
        keep[:, 0] = True
        probs = probs * keep
        if not whole and keep[:, -1].any():
            spill = keep[:, -1].nonzero().squeeze(-1)
    return probs / probs.sum(-1, keepdim=True), ids, spill


def _full(scores: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """The full-vocabulary sampling distribution (r, V) from transformers' own warpers."""
    return torch.softmax(warpers(settings)(None, scores.float()), -1)


def nucleus(scores: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """The sampling distribution (r, V) `sample_tokens` draws from (for tests and inspection)."""
    probs, ids, spill = _truncated(scores, settings)
    if ids is not None:
        probs = torch.zeros_like(scores, dtype=probs.dtype).scatter_(1, ids, probs)
    if spill is not None:
        probs[spill] = _full(scores[spill], settings)
    return probs


def sample_tokens(scores: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """One token id per row (r,), drawn from temperature, top-k and top-p over scores (r, V).

    Top-k renormalises over its k tokens; top-p keeps a token while the mass of the more likely
    ones is below top_p (transformers' rule; the most likely token is always kept). Without
    top-k, only the SLICE most likely tokens are looked at, and a row whose nucleus may reach
    past them (the slice's last token still kept) is drawn from the full-vocabulary warpers.
    """
    probs, ids, spill = _truncated(scores, settings)
    chosen = torch.multinomial(probs, 1)
    chosen = (ids.gather(-1, chosen) if ids is not None else chosen).squeeze(-1)
    if spill is not None:
        chosen[spill] = torch.multinomial(_full(scores[spill], settings), 1).squeeze(-1)
    return chosen


@torch.no_grad()
def decode_compact(model, ids: torch.Tensor, mask: torch.Tensor, settings: GenerationSettings,
                   num_samples: int, eos_ids: list[int], greedy: bool,
                   logps: list[list[float]] | None = None) -> list[list[int]]:
    """New token ids (EOS included when emitted) for each of the B*N rows, prompt-major order.

    ids, mask: (B, T) left-padded prompts, each prompt once. logps: a list to fill with each row's
    log-prob of every new token under the model itself (log-softmax of its logits: temperature 1,
    no top-p or penalties), the reference log-probs of a round whose sampler is its reference.
    """
    sample = not greedy and settings.temperature > 0
    # transformers 5.2x renamed the forward's past_key_values argument to cache.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    eos = torch.tensor(eos_ids, device=ids.device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last position's logits are needed after the prefill.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **keep)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_repeat_interleave(num_samples)
    logits = out.logits[:, -1].repeat_interleave(num_samples, 0)  # (R, V)
    mask = mask.repeat_interleave(num_samples, 0)
    rows = ids.shape[0] * num_samples
    alive = torch.arange(rows, device=ids.device)  # row index of each row in the batch
    done = torch.zeros(rows, dtype=torch.bool, device=ids.device)  # finished, still in the batch
    new_tokens: list[list[int]] = [[] for _ in range(rows)]
    if logps is not None:
        logps[:] = [[] for _ in range(rows)]

    for step in range(settings.max_new_tokens):
        chosen = sample_tokens(logits, settings) if sample else logits.argmax(-1)  # (r,)
        token_logps = (torch.log_softmax(logits.float(), -1).gather(-1, chosen[:, None]).squeeze(-1).tolist()
                       if logps is not None else None)  # (r,)
        for i, (row, token, finished) in enumerate(zip(alive.tolist(), chosen.tolist(), done.tolist())):
            if not finished:
                new_tokens[row].append(token)
                if token_logps is not None:
                    logps[row].append(token_logps[i])
        done |= torch.isin(chosen, eos)
        if step == settings.max_new_tokens - 1 or done.all():
            break
        # Dropping rows copies the whole KV cache: wait until an eighth of the batch has finished.
        if done.sum() * 8 >= len(done):
            index = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(index)
            alive, mask, chosen, done = alive[index], mask[index], chosen[index], done[index]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        out = model(input_ids=chosen[:, None], attention_mask=mask,
                    position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True, **{cache_arg: cache})
        logits = out.logits[:, -1]
    return new_tokens

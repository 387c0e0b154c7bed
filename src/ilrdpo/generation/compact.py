"""A decoding loop that drops finished rows and shares each prompt's prefill among its N samples.

`model.generate` keeps every row of a batch until the longest answer ends, so a batch of 64
samples costs 64 rows for max(len) steps. Here a row leaves the batch (and the KV cache) the
step it emits EOS, and the prompt is prefilled once and its cache repeated N times. Same
sampling semantics as `generate`: the same logits processors, in the same order
(repetition penalty, no-repeat n-grams, then temperature, top-k, top-p), multinomial sampling
from the global torch generator, greedy = argmax.

Used on CPU; on a CUDA device `generation.backend: auto` keeps transformers' compiled
static-cache generate, which is what pays off there.
"""

from __future__ import annotations

import inspect

import torch

from ilrdpo.config import GenerationSettings


def _processors(settings: GenerationSettings, sample: bool):
    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    chain = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.no_repeat_ngram_size > 0:
        chain.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    if sample:
        if settings.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            chain.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            chain.append(TopPLogitsWarper(settings.top_p))
    return chain


@torch.no_grad()
def decode_compact(model, ids: torch.Tensor, mask: torch.Tensor, settings: GenerationSettings,
                   num_samples: int, eos_ids: list[int], greedy: bool) -> list[list[int]]:
    """New token ids (EOS included when emitted) for each of the B*N rows, prompt-major order.

    ids, mask: (B, T) left-padded prompts, each prompt once.
    """
    sample = not greedy and settings.temperature > 0
    processors = _processors(settings, sample)
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
    seqs = ids.repeat_interleave(num_samples, 0)  # (R, T): the processors see prompt + answer
    mask = mask.repeat_interleave(num_samples, 0)
    alive = torch.arange(seqs.shape[0], device=ids.device)  # row index of each live row
    new_tokens: list[list[int]] = [[] for _ in range(seqs.shape[0])]

    for step in range(settings.max_new_tokens):
        scores = processors(seqs, logits.float())  # (r, V)
        if sample:
            chosen = torch.multinomial(torch.softmax(scores, -1), 1).squeeze(-1)  # (r,)
        else:
            chosen = scores.argmax(-1)
        for row, token in zip(alive.tolist(), chosen.tolist()):
            new_tokens[row].append(token)
        keep = ~torch.isin(chosen, eos)
        if step == settings.max_new_tokens - 1 or not keep.any():
            break
        if not keep.all():
            index = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(index)
            alive, seqs, mask, chosen = alive[index], seqs[index], mask[index], chosen[index]
        seqs = torch.cat([seqs, chosen[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        out = model(input_ids=chosen[:, None], attention_mask=mask,
                    position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True, **{cache_arg: cache})
        logits = out.logits[:, -1]
    return new_tokens

"""Sample N answers per prompt: batched, left-padded, sorted by length, resumable.

The orchestration (ordering, batches, seeds, progress file) is backend-free; a backend is one
function `(model, tokenizer, prompt_ids, settings, num_samples, greedy) -> list[list[Sample]]`
in BACKENDS, so a vLLM backend is one more small file.

Reproducibility: prompts are sorted once and cut into fixed batches, and batch k is sampled
with seed (seed, k). A resumed run skips finished batches and samples the rest exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ilrdpo import distributed
from ilrdpo.config import DataSettings, GenerationSettings
from ilrdpo.data import encode_prompt
from ilrdpo.errors import UserInputError
from ilrdpo.progress import console, progress_bar
from ilrdpo.records import Prompt


@dataclass
class Sample:
    text: str
    # |y| in tokens: the tokens generated before EOS (at most max_new_tokens). Decoding and
    # re-encoding is not the identity (a byte-level tokenizer's odd bytes re-encode longer).
    n_tokens: int
    truncated: bool  # cut by max_new_tokens before EOS
    # With keep_logps (the compacting loop): the prompt's and the answer's token ids as decoded (EOS
    # included when emitted) and the answer's log-prob under the sampling model (temperature 1).
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    logp: float | None = None


def _generation_config(model, tokenizer, settings: GenerationSettings, greedy: bool):
    from transformers import GenerationConfig

    eos = {tokenizer.eos_token_id}
    model_eos = getattr(model.generation_config, "eos_token_id", None)
    eos |= set(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else [])
    sample = not greedy and settings.temperature > 0
    # Every knob is set explicitly, "off" values included: transformers fills a None from the
    # model's generation_config.json (which often sets top_k or repetition_penalty). Greedy
    # decoding ignores the sampling knobs, and transformers warns if they are set.
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k} \
        if sample else {}
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=sample, **sampling,
        no_repeat_ngram_size=0, repetition_penalty=1.0,
        eos_token_id=sorted(e for e in eos if e is not None), pad_token_id=tokenizer.pad_token_id,
    )
    if next(model.parameters()).device.type == "cuda":
        # Plain decoding is launch-bound on a GPU; a static cache lets transformers compile the step.
        config.cache_implementation = "static"
    return config


def _left_pad(rows: list[list[int]], pad_id: int, device, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)  # (B, T)


def _decode(tokenizer, new_ids: torch.Tensor, eos_ids: list[int]) -> list[Sample]:
    samples = []
    is_eos = torch.isin(new_ids, torch.tensor(eos_ids, device=new_ids.device))  # (B, T_new)
    for row, row_eos in zip(new_ids, is_eos):
        hits = row_eos.nonzero()
        end = int(hits[0]) if len(hits) else row.shape[0]
        text = tokenizer.decode(row[:end], skip_special_tokens=True).strip()
        samples.append(Sample(text=text, n_tokens=end, truncated=not len(hits)))
    return samples


@torch.no_grad()
def generate_hf(model, tokenizer, prompt_ids: list[list[int]], settings: GenerationSettings,
                num_samples: int, greedy: bool = False, keep_logps: bool = False) -> list[list[Sample]]:
    """transformers generate; the N samples of a prompt are N rows of one batch (KV cache on).
    keep_logps is not supported here: the samples carry none (the train stage then forwards)."""
    device = next(model.parameters()).device
    config = _generation_config(model, tokenizer, settings, greedy)
    # The compiled static-cache step is specialised to the cache's shape: prompt widths rounded up
    # to a multiple of 64 let batches of similar prompts share one compiled graph.
    ids, mask = _left_pad(prompt_ids, tokenizer.pad_token_id, device,
                          64 if config.cache_implementation == "static" else 1)
    ids, mask = ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)  # (B*N, T)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # (B*N, T+new)
    model.train(was_training)
    samples = _decode(tokenizer, out[:, ids.shape[1]:], config.eos_token_id)
    return [samples[i * num_samples:(i + 1) * num_samples] for i in range(len(prompt_ids))]


@torch.no_grad()
def generate_compact(model, tokenizer, prompt_ids: list[list[int]], settings: GenerationSettings,
                     num_samples: int, greedy: bool = False, keep_logps: bool = False) -> list[list[Sample]]:
    """Finished rows leave the batch; each prompt is prefilled once for its N samples. keep_logps:
    each sample also carries its token ids and log-prob (Sample)."""
    from ilrdpo.generation.compact import decode_compact

    device = next(model.parameters()).device
    eos_ids = _generation_config(model, tokenizer, settings, greedy).eos_token_id
    ids, mask = _left_pad(prompt_ids, tokenizer.pad_token_id, device)
    was_training = model.training
    model.eval()
    logps: list[list[float]] | None = [] if keep_logps else None
    rows = decode_compact(model, ids, mask, settings, num_samples, eos_ids, greedy, logps)
    model.train(was_training)
    width = settings.max_new_tokens
    padded = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])  # (R, new)
    samples = _decode(tokenizer, padded, eos_ids)
    if logps is not None:
        for i, sample in enumerate(samples):
            sample.prompt_ids, sample.token_ids = prompt_ids[i // num_samples], rows[i]
            sample.logp = sum(logps[i])
    return [samples[i * num_samples:(i + 1) * num_samples] for i in range(len(prompt_ids))]


def _auto(model, tokenizer, prompt_ids, settings, num_samples, greedy=False, keep_logps=False) -> list[list[Sample]]:
    """GPU: transformers' compiled static-cache generate. CPU: the compacting loop
    (benchmarks/generation_throughput.py, SmolLM2-135M, one thread, 64 new tokens: 28.4 / 37.2 /
    63.2 / 113.8 new tokens/s at 4 / 8 / 16 / 64 rows against 22.0 / 20.8 / 35.7 / 56.3 for one
    batched generate)."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    return (generate_hf if on_gpu else generate_compact)(model, tokenizer, prompt_ids, settings, num_samples, greedy,
                                                          keep_logps)


# server: the sampling stage of `ilrdpo run` goes through a server (generation/server.py); evaluation
# and chat, which hold the model in memory anyway, decode in-process as auto does
BACKENDS = {"auto": _auto, "hf": generate_hf, "compact": generate_compact, "server": _auto}


def generation_model(model):
    """The model to decode with. Under autocast with weights in another dtype (float32 master
    weights of half-precision full fine-tuning), decoding runs on a copy in the autocast dtype,
    outside autocast: a static KV cache needs one dtype (keys after float32 rotary embeddings and
    values from half-precision projections differ under autocast), and half-precision weights are
    what makes decoding fast. The copy costs 2 bytes per parameter while it lives (one call of
    generate_answers); the caller's model is unchanged. Decode with it under autocast_off()."""
    device = next(model.parameters()).device
    if not torch.is_autocast_enabled(device.type):
        return model
    dtype = torch.get_autocast_dtype(device.type)
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return model
    return copy.deepcopy(model).to(dtype)


def autocast_off(decoder, model):
    """Autocast off while decoding with generation_model's copy (already in the compute dtype)."""
    device = next(decoder.parameters()).device
    return torch.autocast(device.type, enabled=False) if decoder is not model else contextlib.nullcontext()


def context_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def encode_prompts(tokenizer, prompts: list[Prompt], data: DataSettings, max_new_tokens: int,
                   context: int | None, source: str = "prompts") -> list[list[int]]:
    """Prompt ids. A prompt that leaves no room for the answer keeps its end (the instruction and
    the generation prompt sit there), counted in one warning; where max_new_tokens alone fills the
    context it is an error naming it."""
    encoded, cut = [], 0
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt.prompt, data.use_chat_template, data.system_prompt)
        if context is not None and len(ids) + max_new_tokens > context:
            if max_new_tokens >= context:
                raise UserInputError(
                    f"{source}: prompt '{prompt.id}' is {len(ids)} tokens; with max_new_tokens="
                    f"{max_new_tokens} it exceeds the model's context of {context} tokens")
            ids, cut = ids[len(ids) + max_new_tokens - context:], cut + 1
        encoded.append(ids)
    if cut:
        console.print(f"[yellow]{source}: {cut} of {len(prompts)} prompts longer than the context allows "
                      f"({context} tokens with max_new_tokens={max_new_tokens}) keep only their end[/yellow]")
    return encoded


def generate_answers(model, tokenizer, prompts: list[Prompt], settings: GenerationSettings, data: DataSettings,
                     *, num_samples: int, seed: int, greedy: bool = False, progress_file: str | Path | None = None,
                     source: str = "prompts", description: str = "generating",
                     keep_logps: bool = False) -> dict[str, list[Sample]]:
    """{prompt id: N samples}. With progress_file, each finished batch is appended there and a
    rerun reuses it, so a killed run loses at most the batch in flight. keep_logps: samples carry
    their token ids and log-prob under `model` where the backend can (Sample)."""
    prompt_ids = encode_prompts(tokenizer, prompts, data, settings.max_new_tokens, context_length(model), source)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompt_ids[i]), i))
    per_batch = max(1, settings.batch_size // num_samples)
    batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]

    done: dict[str, list[Sample]] = {}
    for row in distributed.read_progress(progress_file) if progress_file else []:
        done[row["id"]] = [Sample(**s) for s in row["samples"]]
    own = set(distributed.mine(len(batches)))  # batch k to process k % W: the single-process answers
    backend = BACKENDS[settings.backend]
    new_tokens, start, decoder = 0, time.perf_counter(), None
    with progress_bar(description, len(prompts) * num_samples, done=sum(len(v) for v in done.values())) as bar:
        for k, batch in enumerate(batches):
            if k not in own or all(prompts[i].id in done for i in batch):
                continue
            decoder = decoder if decoder is not None else generation_model(model)
            torch.manual_seed(seed * 1_000_003 + k)
            with autocast_off(decoder, model):
                results = backend(decoder, tokenizer, [prompt_ids[i] for i in batch], settings, num_samples, greedy,
                                  keep_logps and decoder is model)
            for i, samples in zip(batch, results):
                done[prompts[i].id] = samples
                if progress_file:
                    distributed.append_progress(progress_file,
                                                {"id": prompts[i].id, "samples": [s.__dict__ for s in samples]})
            new_tokens += sum(s.n_tokens for r in results for s in r)
            bar.advance(len(batch) * num_samples, tokens_per_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
    return distributed.gather_dict(done)

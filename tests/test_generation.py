"""Smoke tier: sampling N answers per prompt (ilrdpo.generation) with the tiny Llama.

What the model was actually asked and what it actually produced are read from a recording
wrapper around the model's own `generate` (the real one runs): the padded prompt batches that
went in and the raw token ids that came out. The expected Sample of each row is then worked
out from those ids independently of ilrdpo: the answer ends at the first EOS, which is not
counted, and an answer without EOS within max_new_tokens is truncated.
"""

from __future__ import annotations

import pytest
import torch

from ilrdpo.config import DataSettings, GenerationSettings
from ilrdpo.data import as_messages
from ilrdpo.errors import UserInputError
from ilrdpo.generation.sampling import Sample, _decode, encode_prompts, generate_answers
from ilrdpo.records import Prompt

PROMPTS = [
    Prompt(prompt="Why is the sky blue on a clear day, and why are sunsets red?", id="long"),
    Prompt(prompt="Hi", id="short"),
    Prompt(prompt=[{"role": "user", "content": "What is 2 + 2?"}], id="messages"),
    Prompt(prompt="Name three fruits that are yellow.", id="middle"),
    Prompt(prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
           id="system"),
    Prompt(prompt="Tell me a joke", id="joke"),
]
DATA = DataSettings()


def settings(**overrides) -> GenerationSettings:
    # The recording wrapper watches model.generate, so these tests pin the "hf" backend; the
    # compacting backend is checked against it at the end of this file.
    values = {"num_samples": 2, "max_new_tokens": 8, "temperature": 1.0, "batch_size": 4, "backend": "hf"}
    return GenerationSettings(**{**values, **overrides})


def generate(model, tokenizer, prompts=PROMPTS, seed=0, greedy=False, progress_file=None, **overrides):
    gen = settings(**overrides)
    return generate_answers(model, tokenizer, prompts, gen, DATA, num_samples=gen.num_samples, seed=seed,
                            greedy=greedy, progress_file=progress_file)


def record_generate(model) -> list[dict]:
    """Wrap model.generate; each call appends {input_ids, attention_mask, new_ids}."""
    calls: list[dict] = []
    real = model.generate

    def recording(**kwargs):
        out = real(**kwargs)
        width = kwargs["input_ids"].shape[1]
        calls.append({"input_ids": kwargs["input_ids"], "attention_mask": kwargs["attention_mask"],
                      "new_ids": out[:, width:]})
        return out

    model.generate = recording
    return calls


def chat_ids(tokenizer, prompt) -> list[int]:
    encoded = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def texts(result: dict[str, list[Sample]]) -> dict[str, list[str]]:
    return {k: [s.text for s in v] for k, v in result.items()}


def test_n_answers_per_prompt(tiny_model, tokenizer):
    result = generate(tiny_model, tokenizer, num_samples=3)
    assert sorted(result) == sorted(p.id for p in PROMPTS)
    for samples in result.values():
        assert len(samples) == 3
        # n_tokens is |y|: the tokens generated, never more than max_new_tokens (re-encoding a random
        # model's odd bytes may give more)
        assert all(isinstance(s, Sample) and s.n_tokens <= 8 for s in samples)
    assert len({s.text for v in result.values() for s in v}) > 1


def test_batches_are_left_padded_and_sorted_by_prompt_length(tiny_model, tokenizer):
    """batch_size 4 with 2 samples: 2 prompts (4 rows) per generate call, shortest prompts first."""
    calls = record_generate(tiny_model)
    generate(tiny_model, tokenizer)
    assert len(calls) == 3
    lengths = []
    for call in calls:
        ids, mask = call["input_ids"], call["attention_mask"]  # (4, T)
        assert ids.shape[0] == 4
        for row, row_mask in zip(ids, mask):
            n_real = int(row_mask.sum())
            assert row_mask.tolist() == [0] * (len(row_mask) - n_real) + [1] * n_real
            assert (row[:len(row) - n_real] == tokenizer.pad_token_id).all()
            lengths.append(n_real)
        assert ids[0].tolist() == ids[1].tolist() and ids[2].tolist() == ids[3].tolist()  # N rows per prompt
    assert lengths == sorted(lengths)
    assert lengths[::2] == sorted(len(chat_ids(tokenizer, p.prompt)) for p in PROMPTS)


def test_string_and_message_prompts_go_through_the_chat_template(tiny_model, tokenizer):
    calls = record_generate(tiny_model)
    prompts = [Prompt(prompt="What is 2 + 2?", id="text"),
               Prompt(prompt=[{"role": "user", "content": "What is 2 + 2?"}], id="messages")]
    generate(tiny_model, tokenizer, prompts=prompts)
    (call,) = calls
    rows = [row[mask.bool()].tolist() for row, mask in zip(call["input_ids"], call["attention_mask"])]
    expected = chat_ids(tokenizer, [{"role": "user", "content": "What is 2 + 2?"}])
    assert tokenizer.decode(expected).endswith("<|im_start|>assistant\n")
    assert rows == [expected] * 4


def test_encode_prompts_uses_the_chat_template_for_both_forms(tokenizer):
    system = PROMPTS[4]
    (ids,) = encode_prompts(tokenizer, [system], DATA, max_new_tokens=8, context=None)
    assert ids == chat_ids(tokenizer, system.prompt)
    assert "Be brief." in tokenizer.decode(ids)


def test_decode_by_hand(tokenizer):
    """Rows of new ids (pad = EOS in SmolLM2): [a b EOS EOS] stops after 2 tokens, [a b c d]
    is cut by max_new_tokens, [EOS ...] is the empty answer. n_tokens counts the tokens generated
    before EOS, the one definition of |y| for a sampled answer."""
    eos = tokenizer.eos_token_id
    a, b, c, d = tokenizer(" Paris is a big city", add_special_tokens=False)["input_ids"][:4]
    new_ids = torch.tensor([[a, b, eos, eos], [a, b, c, d], [eos, eos, eos, eos]])
    samples = _decode(tokenizer, new_ids, [eos])
    first, second = tokenizer.decode([a, b]).strip(), tokenizer.decode([a, b, c, d]).strip()
    assert samples[0] == Sample(text=first, n_tokens=2, truncated=False)
    assert samples[1] == Sample(text=second, n_tokens=4, truncated=True)
    assert samples[2] == Sample(text="", n_tokens=0, truncated=False)


def test_answers_stop_at_eos_and_count_tokens_without_it(tiny_model, tokenizer):
    """An EOS-prone tiny model (its EOS logit raised by 2 at the output head; top_k=20 so that
    EOS competes with 19 tokens, not with the whole vocabulary): some answers stop early, some
    run into max_new_tokens. Each Sample must match the raw ids the model produced."""
    eos = tokenizer.eos_token_id

    def raise_eos(module, inputs, logits):
        logits = logits.clone()
        logits[..., eos] += 2.0
        return logits

    tiny_model.lm_head.register_forward_hook(raise_eos)
    calls = record_generate(tiny_model)
    result = generate(tiny_model, tokenizer, top_k=20, seed=3)
    samples = [s for p in sorted(PROMPTS, key=lambda p: len(chat_ids(tokenizer, p.prompt)))
               for s in result[p.id]]
    # generate stops a batch once every row has its EOS: batches differ in width
    rows = [row for call in calls for row in call["new_ids"].tolist()]
    assert len(samples) == len(rows) == 12
    for sample, row in zip(samples, rows):
        end = row.index(eos) if eos in row else len(row)
        assert sample.n_tokens == end
        assert sample.truncated == (eos not in row[:8])
        assert sample.text == tokenizer.decode(row[:end], skip_special_tokens=True).strip()
        assert eos not in tokenizer(sample.text, add_special_tokens=False)["input_ids"]
    assert {s.truncated for s in samples} == {True, False}, "the test needs both kinds of answers"


def test_same_seed_same_answers(tiny_model, tokenizer):
    first = texts(generate(tiny_model, tokenizer, seed=5))
    assert texts(generate(tiny_model, tokenizer, seed=5)) == first
    assert texts(generate(tiny_model, tokenizer, seed=6)) != first


def test_greedy_is_deterministic_and_ignores_the_seed(tiny_model, tokenizer):
    greedy = texts(generate(tiny_model, tokenizer, seed=1, greedy=True))
    assert texts(generate(tiny_model, tokenizer, seed=2, greedy=True)) == greedy
    assert all(a == b for a, b in greedy.values())  # the N greedy answers of a prompt agree
    # temperature 0 means greedy, too
    assert texts(generate(tiny_model, tokenizer, seed=3, temperature=0.0)) == greedy


def test_resumed_run_gives_the_uninterrupted_answers(tiny_model, tokenizer, tmp_path):
    """3 batches of 2 prompts. Drop the last 3 progress lines (batch 3 and half of batch 2), as a
    kill would: the rerun samples only batches 2 and 3, each whole and with its own seed, and
    the answers equal those of a run that was never interrupted."""
    uninterrupted = generate(tiny_model, tokenizer, seed=11)
    progress = tmp_path / "generation.partial.jsonl"
    assert generate(tiny_model, tokenizer, seed=11, progress_file=progress) == uninterrupted
    lines = progress.read_text().splitlines(keepends=True)
    assert len(lines) == len(PROMPTS)
    progress.write_text("".join(lines[:-3]))

    calls = record_generate(tiny_model)
    resumed = generate(tiny_model, tokenizer, seed=11, progress_file=progress)
    assert len(calls) == 2
    assert resumed == uninterrupted


def test_finished_progress_file_samples_nothing(tiny_model, tokenizer, tmp_path):
    progress = tmp_path / "generation.partial.jsonl"
    first = generate(tiny_model, tokenizer, seed=4, progress_file=progress)
    calls = record_generate(tiny_model)
    assert generate(tiny_model, tokenizer, seed=4, progress_file=progress) == first
    assert calls == []


def test_prompt_with_no_room_left_names_the_prompt(tokenizer):
    """max_new_tokens alone fills the context: no end of the prompt fits, an error naming it."""
    prompt = Prompt(prompt="word " * 600, id="too-long")
    with pytest.raises(UserInputError, match=r"prompt 'too-long' is \d+ tokens.*context of 512"):
        encode_prompts(tokenizer, [prompt], DATA, max_new_tokens=512, context=512)


def test_prompt_longer_than_the_context_keeps_its_end(tiny_model, tokenizer, capfd):
    """The default: the tiny model's context is 512 positions; 600 words keep their last 504
    tokens (the end of the text and the generation prompt), counted in a warning, and generate."""
    long = Prompt(prompt="word " * 600, id="too-long")
    (ids,) = encode_prompts(tokenizer, [long], DATA, max_new_tokens=8, context=512)
    full = chat_ids(tokenizer, long.prompt)
    assert ids == full[-504:]
    assert "1 of 1 prompts longer than the context" in capfd.readouterr().err
    result = generate(tiny_model, tokenizer, prompts=PROMPTS[:1] + [long])
    assert len(result["too-long"]) == 2


def test_context_check_boundary(tokenizer):
    """A prompt of n tokens with m new tokens fits a context of exactly n + m, not n + m - 1."""
    prompt = Prompt(prompt="Hi", id="hi")
    n = len(chat_ids(tokenizer, "Hi"))
    assert encode_prompts(tokenizer, [prompt], DATA, max_new_tokens=8, context=n + 8) == [chat_ids(tokenizer, "Hi")]
    assert encode_prompts(tokenizer, [prompt], DATA, max_new_tokens=8, context=n + 7) == [chat_ids(tokenizer, "Hi")[1:]]


def test_top_k_zero_samples_from_the_whole_vocabulary(tiny_model, tokenizer):
    """The tiny model's next-token distribution is nearly flat over 49,152 tokens, so a sample
    from the full distribution falls outside the 50 likeliest tokens with probability ~0.999;
    of 8 first tokens, all inside the top 50 means a top-k filter was applied."""
    calls = record_generate(tiny_model)
    prompt = Prompt(prompt="Hi", id="hi")
    generate(tiny_model, tokenizer, prompts=[prompt], num_samples=8, max_new_tokens=1, batch_size=8, top_k=0)
    first_tokens = calls[0]["new_ids"][:, 0]  # (8,)
    with torch.no_grad():
        logits = tiny_model(torch.tensor([chat_ids(tokenizer, "Hi")])).logits[0, -1]  # (V,)
    ranks = [(logits > logits[t]).sum().item() for t in first_tokens]
    assert max(ranks) >= 50


def test_answers_depend_on_the_settings_not_on_the_models_generation_config(tiny_model, tokenizer):
    """A hub model's generation_config.json often sets top_k or repetition_penalty; the configured
    generation settings (here top_k=0 and repetition_penalty=1.0, i.e. off) must still decide."""
    sampled = texts(generate(tiny_model, tokenizer, seed=2))
    greedy = texts(generate(tiny_model, tokenizer, greedy=True))
    tiny_model.generation_config.top_k = 5
    tiny_model.generation_config.repetition_penalty = 1.5
    assert texts(generate(tiny_model, tokenizer, seed=2)) == sampled
    assert texts(generate(tiny_model, tokenizer, greedy=True)) == greedy


# --- the compacting backend (generation.backend: compact, the CPU default) ---------------------


def eos_prone(model, tokenizer, boost: float, every: int = 1):
    """Raise the EOS logit so that answers end at different steps (rows leave the batch).
    With every > 1 only where the current input token id is a multiple of `every`, so that
    greedy answers, too, end at different steps. Returns a function that removes the hooks."""
    eos, current = tokenizer.eos_token_id, {}

    def remember(module, args, kwargs):
        current["ids"] = kwargs["input_ids"]

    def boost_eos(module, inputs, output):
        if every > 1 and current["ids"].shape[1] > 1:
            return output  # prefill: the prompt's last token is the same in every row
        where = (current["ids"][:, -1:] % every == 0).to(output.dtype)  # (B, 1)
        output[..., eos] += boost * where
        return output

    handles = [model.register_forward_pre_hook(remember, with_kwargs=True),
               model.lm_head.register_forward_hook(boost_eos)]
    return lambda: [h.remove() for h in handles]


def test_compact_greedy_equals_transformers_generate(tiny_model, tokenizer):
    """Greedy decoding is deterministic, so dropping finished rows and sharing the prefill must
    not change a single token: same Samples as model.generate, with answers of mixed lengths."""
    remove = eos_prone(tiny_model, tokenizer, boost=50.0, every=3)
    try:
        hf = generate(tiny_model, tokenizer, greedy=True, num_samples=1, max_new_tokens=12)
        compact = generate(tiny_model, tokenizer, greedy=True, num_samples=1, max_new_tokens=12,
                           backend="compact")
    finally:
        remove()
    assert compact == hf
    lengths = {s.n_tokens for v in hf.values() for s in v}
    assert len(lengths) > 1  # rows really finished at different steps


def test_compact_sampling_is_seeded_and_respects_eos_and_max_new_tokens(tiny_model, tokenizer):
    """EOS boosted by 9.5 nats over a nearly flat 49k vocabulary: about a 21% chance per step,
    so of 24 rows some end early and some run into max_new_tokens."""
    remove = eos_prone(tiny_model, tokenizer, boost=9.5)
    try:
        a = generate(tiny_model, tokenizer, seed=5, backend="compact", num_samples=4)
        b = generate(tiny_model, tokenizer, seed=5, backend="compact", num_samples=4)
        c = generate(tiny_model, tokenizer, seed=6, backend="compact", num_samples=4)
    finally:
        remove()
    assert a == b and a != c
    samples = [s for v in a.values() for s in v]
    assert all(len(v) == 4 for v in a.values())
    assert all(s.n_tokens <= 8 and s.truncated == (s.n_tokens == 8) for s in samples)
    assert any(not s.truncated for s in samples) and any(s.truncated for s in samples)


@pytest.mark.parametrize("backend", ["hf", "compact"])
def test_under_autocast_float32_weights_decode_as_a_copy_in_the_compute_dtype(tiny_model, tokenizer, backend):
    """Half-precision full fine-tuning keeps float32 master weights and decodes under autocast:
    decoding then runs on a bfloat16 copy with autocast off (one dtype for a static KV cache, the
    failure seen on CUDA), giving exactly the answers of that copy, and the weights stay float32."""
    import copy

    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = texts(generate(tiny_model, tokenizer, seed=3, backend=backend))
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)
    assert texts(generate(half, tokenizer, seed=3, backend=backend)) == under_autocast
    from ilrdpo.generation import generation_model

    assert generation_model(tiny_model) is tiny_model  # no autocast: the model itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = generation_model(tiny_model)
        assert decoder is not tiny_model and all(p.dtype == torch.bfloat16 for p in decoder.parameters())
        assert generation_model(half) is half  # already in the compute dtype


# --- the compacting backend's sampler: top-k / top-p over a slice, full sort as fallback ---------

WARPER_SETTINGS = [{"top_p": 0.95}, {"top_p": 0.5}, {"top_k": 5}, {"top_k": 300, "top_p": 0.9},
                   {"top_k": 5, "top_p": 0.6}, {}, {"top_p": 0.99, "temperature": 0.7}, {"top_p": 0.3, "temperature": 1.0}]


@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])  # flat (nucleus wider than the slice) to peaked
@pytest.mark.parametrize("warp", WARPER_SETTINGS)
def test_nucleus_is_the_distribution_of_transformers_warpers(scale, warp):
    """The compacting loop's sampling distribution equals softmax(transformers' temperature, top-k,
    top-p warpers) over the whole vocabulary, including rows whose nucleus spills past the slice."""
    from ilrdpo.generation.compact import SLICE, nucleus, warpers

    settings = GenerationSettings(**{"temperature": 0.8, **warp})
    generator = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(6, 4 * SLICE, generator=generator) * scale
    expected = torch.softmax(warpers(settings)(None, logits.clone()), -1)
    got = nucleus(logits, settings)
    assert torch.equal(got > 0, expected > 0)  # the same tokens can be drawn
    torch.testing.assert_close(got, expected, atol=2e-7, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.1, 4.0])  # 0.1: the nucleus spills past the slice
def test_sample_tokens_draws_from_nucleus(scale):
    """Counts of 40k draws fit the distribution: Pearson's chi-square within 6 standard deviations
    of its mean (degrees of freedom = kept tokens - 1); drawing from the wrong rows' distribution
    or a truncated nucleus puts it far out."""
    from ilrdpo.generation.compact import SLICE, nucleus, sample_tokens

    settings = GenerationSettings(temperature=0.8, top_p=0.9)
    logits = torch.randn(1, 2 * SLICE, generator=torch.Generator().manual_seed(1)) * scale
    expected = nucleus(logits, settings)[0]
    torch.manual_seed(0)
    draws = sample_tokens(logits.expand(40_000, -1), settings)
    counts = torch.bincount(draws, minlength=logits.shape[-1]).double()
    assert (counts[expected == 0] == 0).all()
    kept = expected > 0
    want = expected[kept].double() * len(draws)
    chi_square = float(((counts[kept] - want) ** 2 / want).sum())
    freedom = int(kept.sum()) - 1
    assert freedom > (SLICE if scale < 1 else 2)
    assert abs(chi_square - freedom) < 6 * (2 * freedom) ** 0.5

"""Sequence log-probs (ilrdpo.logprobs) against a naive per-example computation.

The naive reference runs each example alone (no padding, positions 0..n-1) through a float64
copy of the model and takes the full log_softmax: sum over answer tokens y_t of
log softmax(logits[t-1])[y_t]. Our batched, padded, chunked head must agree with it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ilrdpo.logprobs import (
    PLAIN_HEAD_MODEL_TYPES,
    ld_weights,
    position_ids_from_mask,
    sequence_logps,
)

VOCAB = 64
PAD = 5  # also used as a real token inside the examples: masking must not go by token value
# (prompt length, answer length): mixed, including a one-token answer and a one-token prompt.
SHAPES = [(3, 5), (7, 1), (1, 8), (5, 4)]
SMALL = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def make_examples(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n_prompt, n_answer in SHAPES:
        ids = torch.randint(0, VOCAB, (n_prompt + n_answer,), generator=generator).tolist()
        ids[0] = PAD
        examples.append((ids[:n_prompt], ids[n_prompt:]))
    return examples


def batch(examples, side: str = "right", pad_id: int = PAD):
    """(input_ids, attention_mask, response_mask), each (B, T), padded on `side`."""
    width = max(len(p) + len(a) for p, a in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
    response_mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        n = len(prompt) + len(answer)
        start = 0 if side == "right" else width - n
        input_ids[row, start:start + n] = torch.tensor(prompt + answer)
        attention_mask[row, start:start + n] = 1
        response_mask[row, start + len(prompt):start + n] = 1
    return input_ids, attention_mask, response_mask


def naive_logps(model, examples, weights: list[list[float]] | None = None) -> torch.Tensor:
    """Each example alone, full log_softmax in the model's own dtype; optional per-answer-token weights."""
    out = []
    for i, (prompt, answer) in enumerate(examples):
        ids = torch.tensor([prompt + answer])
        logits = model(input_ids=ids).logits[0]  # (n, V)
        logp = torch.log_softmax(logits, -1)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
        token_logps = logp[positions, torch.tensor(answer)]  # (n_answer,)
        w = torch.ones_like(token_logps) if weights is None else torch.tensor(weights[i], dtype=logp.dtype)
        out.append((token_logps * w).sum())
    return torch.stack(out)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, **SMALL)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **SMALL)
    return GPT2LMHeadModel(config).eval()


def tiny_gemma2(seed: int = 0):
    """Gemma 2 soft-caps its logits: cap * tanh(logits / cap). A small cap makes that matter."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, intermediate_size=64, final_logit_softcapping=0.5, **SMALL)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # larger head weights, so logits reach the cap
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    return model, copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def naive64(llama):
    with torch.no_grad():
        return naive_logps(llama[1], make_examples())


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("grad", [False, True])
def test_matches_naive_float64(llama, naive64, side, chunk_size, grad):
    model, _ = llama
    input_ids, attention_mask, response_mask = batch(make_examples(), side)
    with torch.set_grad_enabled(grad):
        logps, n_tokens = sequence_logps(model, input_ids, attention_mask, response_mask, chunk_size=chunk_size)
    assert logps.dtype == torch.float32 and logps.shape == (4,)
    assert n_tokens.tolist() == [a for _, a in SHAPES]
    assert logps.requires_grad == grad
    torch.testing.assert_close(logps.detach().double(), naive64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_gradients_match_naive_float32(side, chunk_size):
    """backward(sum of our log-probs) equals backward(sum of the naive float32 log-probs)."""
    model = tiny_llama(seed=1)
    examples = make_examples(seed=1)
    input_ids, attention_mask, response_mask = batch(examples, side)
    ours, _ = sequence_logps(model, input_ids, attention_mask, response_mask, chunk_size=chunk_size)
    ours_grads = torch.autograd.grad(ours.sum(), list(model.parameters()))
    naive = naive_logps(model, examples)
    naive_grads = torch.autograd.grad(naive.sum(), list(model.parameters()))
    torch.testing.assert_close(ours.detach(), naive.detach(), rtol=1e-5, atol=1e-4)
    for (name, _), g_ours, g_naive in zip(model.named_parameters(), ours_grads, naive_grads):
        assert torch.isfinite(g_ours).all(), name
        assert g_ours.abs().sum() > 0, name
        torch.testing.assert_close(g_ours, g_naive, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_gemma2], ids=["gpt2", "gemma2_softcap"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_general_path_is_exact(make, side):
    """Models outside PLAIN_HEAD_MODEL_TYPES go through model(...).logits (soft-capping kept)."""
    model = make()
    assert model.config.model_type not in PLAIN_HEAD_MODEL_TYPES
    examples = make_examples(seed=2)
    with torch.no_grad():
        expected = naive_logps(copy.deepcopy(model).double(), examples)
    for chunk_size in (3, 1024):
        logps, n_tokens = sequence_logps(model, *batch(examples, side), chunk_size=chunk_size)
        torch.testing.assert_close(logps.detach().double(), expected, rtol=1e-5, atol=1e-4)
        assert n_tokens.tolist() == [a for _, a in SHAPES]
    logps.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_softcapping_is_why_gemma2_needs_the_general_path():
    """Guard: on Gemma 2, lm_head(last hidden state) is not the logits, so a plain-head shortcut
    would be wrong by a visible amount; the test above would catch it."""
    model = tiny_gemma2()
    ids = torch.tensor([make_examples()[0][0] + make_examples()[0][1]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        plain = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state)
    assert (logits - plain).abs().max() > 0.1


TINY_ANY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, head_dim=16, num_local_experts=2, num_experts=2, num_experts_per_tok=1,
                moe_intermediate_size=16, shared_expert_intermediate_size=16, max_position_embeddings=64, **SMALL)


@pytest.mark.parametrize("model_type", sorted(PLAIN_HEAD_MODEL_TYPES))
def test_plain_head_model_types_really_have_plain_heads(model_type):
    """For each listed architecture, logits == output_embeddings(decoder(x)) exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **TINY_ANY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        plain = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-6)


def test_ld_weights_by_hand():
    """Two pairs, rows [chosen 1, chosen 2, rejected 1, rejected 2], ld_alpha = 0.25.

    pair 1: chosen has 3 answer tokens, rejected 1 -> shared length 1
        chosen 1 weights on its answer tokens: [1, 0.25, 0.25]; rejected 1: [1]
    pair 2: chosen has 2, rejected 4 -> shared length 2
        chosen 2: [1, 1]; rejected 2: [1, 1, 0.25, 0.25]
    Prompt and padding positions stay 0.
    """
    mask = torch.tensor([
        [0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1],
    ])
    expected = torch.tensor([
        [0, 1, 0.25, 0.25, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0.25, 0.25],
    ])
    torch.testing.assert_close(ld_weights(mask, 2, 0.25), expected)
    torch.testing.assert_close(ld_weights(mask, 2, 1.0), mask.float())


def test_float_weights_give_the_weighted_sum(llama):
    """A float response mask w gives sum_t w_t log pi(y_t | ...), and n_tokens counts w_t != 0."""
    model, model64 = llama
    examples = make_examples()
    input_ids, attention_mask, response_mask = batch(examples, "left")
    generator = torch.Generator().manual_seed(3)
    weights = torch.rand(response_mask.shape, generator=generator) * response_mask
    answer_weights = [weights[row][response_mask[row].bool()].tolist() for row in range(len(examples))]
    with torch.no_grad():
        logps, n_tokens = sequence_logps(model, input_ids, attention_mask, weights, chunk_size=3)
        expected = naive_logps(model64, examples, answer_weights)
        unweighted = naive_logps(model64, examples)
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(logps.double(), unweighted, atol=1e-2)
    assert n_tokens.tolist() == [a for _, a in SHAPES]


def test_ld_weighted_logps_split_shared_and_tail(llama):
    """With the LD-DPO mask, logp = shared part + ld_alpha * tail part, from per-token naive values.

    Pair (examples 0 and 1): answers of 5 and 1 tokens -> shared 1; chosen = t1 + 0.5 (t2+..+t5).
    """
    model, model64 = llama
    examples = make_examples()[:2]  # answers of 5 and 1 tokens: one pair [chosen; rejected]
    input_ids, attention_mask, response_mask = batch(examples, "right")
    with torch.no_grad():
        logps, _ = sequence_logps(model, input_ids, attention_mask, ld_weights(response_mask, 1, 0.5))
        expected = naive_logps(model64, examples, [[1, 0.5, 0.5, 0.5, 0.5], [1]])
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-4)


def test_empty_answer_mask_gives_zero():
    model = tiny_llama()
    input_ids, attention_mask, response_mask = batch(make_examples()[:2])
    with torch.no_grad():
        logps, n_tokens = sequence_logps(model, input_ids, attention_mask, torch.zeros_like(response_mask))
    assert logps.tolist() == [0.0, 0.0] and n_tokens.tolist() == [0, 0]


# --- prefix sharing ------------------------------------------------------------------------------
# (prompt, chosen, rejected) lengths: answers longer and shorter than each other, a one-token
# answer, a one-token prompt, and an empty prompt (its answers' first tokens have no predictor).
PACKED_SHAPES = [(3, 5, 2), (7, 1, 4), (1, 8, 8), (5, 4, 6), (0, 3, 2)]


def tokenized_pairs(seed: int = 0):
    from ilrdpo.data import TokenizedPair

    generator = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r), c, r) for p, c, r in PACKED_SHAPES]


def logps_and_grads(model, run):
    logps, n_tokens = run(model)
    grads = torch.autograd.grad(logps.sum(), [p for p in model.parameters() if p.requires_grad])
    return logps.detach(), n_tokens, grads


# Llama's RMSNorm computes in float32 whatever the weights' dtype, so its float64 copy agrees to
# float32 precision only; GPT-2's LayerNorm keeps float64, so GPT-2 is held to 1e-10 there.
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_gemma2], ids=["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("ld_alpha", [None, 0.3])
def test_shared_prefix_gives_the_plain_logps_and_gradients(make, dtype, attention, ld_alpha):
    """One row per pair (prompt once) = [chosen rows; rejected rows] with the prompt twice:
    the same summed log-probs, token counts and parameter gradients, LD-DPO weights included."""
    from ilrdpo.data import collate_pairs, collate_shared_prefix
    from ilrdpo.logprobs import shared_prefix_logps, shared_prefix_supported

    if make is tiny_gemma2 and attention == "sdpa":
        pytest.skip("Gemma 2 soft-caps attention scores, which transformers runs in eager only")
    model = make().to(dtype)
    model.config._attn_implementation = attention
    examples = tokenized_pairs()
    plain, packed = collate_pairs(examples, PAD), collate_shared_prefix(examples, PAD)
    mask = plain["response_mask"]
    if ld_alpha is not None:
        mask = ld_weights(mask, len(examples), ld_alpha)
    assert shared_prefix_supported(model, packed["input_ids"].shape[1])
    expected, expected_n, expected_grads = logps_and_grads(
        model, lambda m: sequence_logps(m, plain["input_ids"], plain["attention_mask"], mask, chunk_size=3))
    logps, n_tokens, grads = logps_and_grads(
        model, lambda m: shared_prefix_logps(m, packed, ld_alpha=ld_alpha, chunk_size=3))
    tolerance = TOLERANCE[torch.float32 if make is not tiny_gpt2 else dtype]
    torch.testing.assert_close(logps, expected, **tolerance)
    assert n_tokens.tolist() == expected_n.tolist()
    for (name, _), grad, expected_grad in zip(model.named_parameters(), grads, expected_grads):
        assert expected_grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected_grad, **tolerance, msg=name)


def test_shared_prefix_mask_by_hand():
    """Row: prompt p p, chosen c c, rejected r, pad. True = the query (row) may attend the key:
    causal; rejected sees the prompt and itself, never the chosen answer; the pad sees itself."""
    from ilrdpo.logprobs import shared_prefix_mask

    segments = torch.tensor([[1, 1, 2, 2, 3, 0]])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],  # p
        [1, 1, 0, 0, 0, 0],  # p
        [1, 1, 1, 0, 0, 0],  # c
        [1, 1, 1, 1, 0, 0],  # c
        [1, 1, 0, 0, 1, 0],  # r
        [0, 0, 0, 0, 0, 1],  # pad
    ], dtype=torch.bool)
    assert shared_prefix_mask(segments, "sdpa").tolist() == [[expected.tolist()]]
    additive = shared_prefix_mask(segments, "eager")[0, 0]
    assert (additive[expected] == 0).all() and (additive[~expected] == torch.finfo(torch.float32).min).all()


def test_shared_prefix_is_refused_where_a_sliding_window_is_shorter_than_the_row():
    from ilrdpo.logprobs import shared_prefix_supported

    model = tiny_llama()
    assert shared_prefix_supported(model, 10_000)
    model.config.sliding_window = 16
    assert shared_prefix_supported(model, 16) and not shared_prefix_supported(model, 17)
    model.config.sliding_window = None
    model.config._attn_implementation = "flash_attention_2"
    assert not shared_prefix_supported(model, 8)

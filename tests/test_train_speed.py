"""The training step's speed levers for a GPU, each checked on the CPU against the plain path:

- host syncs: a micro-batch brings its metrics and its loss's finiteness to the host in one
  transfer (on a GPU every `.item()` waits for the device), with the values `.item()` gives;
- fused AdamW (one kernel for all tensors, on CPU and CUDA): the same update as the for-each path;
- the log-prob head keeps its logits in the compute dtype for backward (bfloat16 on a GPU: half
  the bytes of cross_entropy's float32 log-softmax), with cross_entropy's values and gradients;
- the log-prob head recomputed per chunk in backward: no vocabulary-wide logits saved for the
  backward pass, and the same log-probs and gradients as keeping them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ilrdpo.config import LossSettings
from ilrdpo.engines import Engine, local_norm
from ilrdpo.loss import length_reversed, pair_accuracy, preference_loss
from ilrdpo.train import SATURATED_LOGITS, STATS, _fused_ok, _micro_step, loss_at_reference

TRANSFERS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture
def host_transfers(monkeypatch):
    """Counts tensor-to-host transfers (each a device sync on a GPU) while a test runs."""
    calls: list[str] = []
    for name in TRANSFERS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def micro_batch(seed: int, n: int = 3):
    generator = torch.Generator().manual_seed(seed)
    policy = (-20 * torch.rand(2 * n, generator=generator, dtype=torch.float64)).requires_grad_()  # (2B,)
    ref = -20 * torch.rand(n, 2, generator=generator, dtype=torch.float64)  # (B, 2)
    lengths = torch.randint(1, 300, (2 * n,), generator=generator).float()  # (2B,)
    batch = {"lengths": lengths, "scored_tokens": lengths.long()}
    return policy, ref, batch


def one_by_one(policy, ref, batch, loss: LossSettings) -> dict[str, float]:
    """The metrics as the step took them before: one `.item()` each."""
    n = ref.shape[0]
    lengths, scored = batch["lengths"], batch["scored_tokens"]
    out = preference_loss(policy[:n], policy[n:], ref[:, 0], ref[:, 1], lengths[:n], lengths[n:],
                          loss_type=loss.type, beta=loss.beta, alpha=loss.alpha, target_length=loss.target_length,
                          label_smoothing=loss.label_smoothing, simpo_gamma=loss.simpo_gamma,
                          chosen_scored_tokens=scored[:n], rejected_scored_tokens=scored[n:])
    values = [out.losses.mean(), out.chosen_rewards.mean(), out.rejected_rewards.mean(),
              (out.chosen_rewards - out.rejected_rewards).mean(),
              pair_accuracy(out.chosen_rewards, out.rejected_rewards).mean(), policy[:n].mean(), policy[n:].mean(),
              lengths[:n].mean(), lengths[n:].mean(), out.length_term.mean(),
              (out.length_term.abs() > SATURATED_LOGITS).float().mean(),
              length_reversed(out.length_term, loss.type, loss.label_smoothing).float().mean(),
              loss_at_reference(out.length_term, loss).mean()]
    return dict(zip(STATS, (v.item() for v in values)))


@pytest.mark.unit
@pytest.mark.parametrize("loss", [LossSettings(alpha=0.02), LossSettings(type="ipo", alpha=0.01),
                                  LossSettings(type="simpo", alpha=0.0), LossSettings(label_smoothing=0.1)],
                         ids=["sigmoid", "ipo", "simpo", "cdpo"])
def test_a_micro_step_syncs_once_and_gives_the_one_by_one_metrics(host_transfers, loss):
    policy, ref, batch = micro_batch(seed=1)
    expected = one_by_one(policy, ref, batch, loss)
    seen = []
    host_transfers.clear()
    stats = _micro_step(policy, batch, ref, [0, 1, 2], loss, 0.5, lambda losses, weight, finite: seen.append(finite))
    assert host_transfers == ["tolist"]  # was 13 `.item()` calls, and one more in the backward
    assert stats == expected  # exactly: float64 holds the float32 and float64 means alike
    assert seen == [True]


@pytest.mark.unit
def test_a_non_finite_loss_reaches_the_backward_as_not_finite():
    policy, ref, batch = micro_batch(seed=2)
    with torch.no_grad():
        policy[1] = float("nan")
    seen = []
    stats = _micro_step(policy, batch, ref, [0, 1, 2], LossSettings(), 1.0,
                        lambda losses, weight, finite: seen.append(finite))
    assert seen == [False] and stats["loss"] != stats["loss"]  # NaN


@pytest.mark.unit
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "NaN loss: skipped"])
def test_engine_backward_given_the_finiteness_does_not_sync_and_does_the_same(host_transfers, poison):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads = []
    for finite in (None, not poison):
        weights = torch.arange(1.0, 5.0, requires_grad=True)  # (4,)
        losses = weights * torch.tensor([1.0, float("nan") if poison else 2.0, 3.0, 4.0])
        host_transfers.clear()
        Engine().backward(losses, 0.25, scaler, finite=finite)
        assert host_transfers == ([] if finite is not None else ["__bool__"])
        grads.append(weights.grad)
    assert (grads[0] is None) == (grads[1] is None) == poison
    if not poison:
        assert torch.equal(grads[0], grads[1])


@pytest.mark.unit
def test_fused_adamw_takes_the_for_each_paths_steps():
    """The round's AdamW is fused where every parameter allows it (train._fused_ok: CPU and CUDA,
    float32 and half dtypes): the same weights as the for-each path to float32 round-off."""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=generator), torch.randn(32, generator=generator)]
    grads = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(5)]
    trained = []
    for fused in (True, False):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        assert _fused_ok(params)
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused, foreach=None if fused else True)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        trained.append([p.detach() for p in params])
    for fused_p, foreach_p, before in zip(*trained, start):
        assert not torch.equal(fused_p, before)
        torch.testing.assert_close(fused_p, foreach_p, rtol=1e-6, atol=1e-7)
    assert not _fused_ok([torch.nn.Parameter(torch.zeros(2, device="meta"))])


@pytest.mark.unit
def test_the_guards_weight_norm_copies_no_half_precision_weight(monkeypatch):
    """engines.local_norm, after every step: float32 weights give the norm of the plain formula
    exactly, bfloat16 ones its value over their float32 copies, which it no longer makes."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(300, 200, generator=generator), torch.randn(77, generator=generator)]
    plain = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in weights])))
    assert local_norm([torch.nn.Parameter(w) for w in weights]) == pytest.approx(plain, rel=1e-6)
    assert local_norm(weights) == float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(weights))))
    half = [w.bfloat16() for w in weights]
    copies = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm([w.float() for w in half]))))
    casts = []
    original = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **k: casts.append(self.shape) or original(self, *a, **k))
    assert local_norm(half) == pytest.approx(copies, rel=1e-6)
    assert casts == []


# --- the head: recomputed per chunk in backward, no vocabulary-wide logits kept ----------------------

VOCAB = 4096


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).float()


def head_pass(model, monkeypatch, budget: int):
    """Summed log-probs, their gradients, and the shapes saved for backward outside checkpoints."""
    from ilrdpo import logprobs

    monkeypatch.setattr(logprobs, "HEAD_MEMORY_BUDGET", budget)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (4, 24), generator=generator)  # (B, T)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 18:] = 0
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, 10:] = 1
    response_mask[1, 18:] = 0
    saved = []

    def keep(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logps, _ = logprobs.sequence_logps(model, input_ids, attention_mask, response_mask, chunk_size=16)
    (logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved


@pytest.mark.smoke
def test_the_recomputed_head_keeps_no_vocabulary_wide_logits_and_gives_the_kept_heads_result(monkeypatch):
    """Above logprobs.head_memory_budget the head's logits are recomputed chunk by chunk in the
    backward pass: nothing of width VOCAB is saved for backward (the kept path saves its float32
    log-softmax, which is how this check can fail), and log-probs and gradients are the same."""
    model = tiny_llama()
    kept_logps, kept_grads, kept_saved = head_pass(model, monkeypatch, budget=2**40)
    logps, grads, saved = head_pass(model, monkeypatch, budget=0)
    assert any(shape[-1] == VOCAB and len(shape) == 2 and shape[0] > 1 for shape in kept_saved)
    assert not any(shape[-1] == VOCAB and shape[0] > 1 for shape in saved if len(shape) == 2 and shape != (VOCAB, 32))
    torch.testing.assert_close(logps, kept_logps, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, kept_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    total = 0

    def keep(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = fn()
    return out, total


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logps_are_cross_entropys_and_keep_the_logits_in_their_own_dtype(dtype):
    """logprobs._token_logps against the cross_entropy it replaced (-cross_entropy of the float32
    logits): the same values and logit gradients to float32 round-off; what it keeps for backward
    is the logits in their dtype plus one float per row, half of cross_entropy's under bfloat16."""
    from ilrdpo.logprobs import _token_logps

    generator = torch.Generator().manual_seed(0)
    start = (4 * torch.randn(37, 1000, generator=generator)).to(dtype)  # (n, V)
    targets = torch.randint(0, 1000, (37,), generator=generator)
    grad = torch.randn(37, generator=generator)
    results = {}
    for name, fn in {"new": _token_logps, "old": lambda x, t: -F.cross_entropy(x.float(), t, reduction="none")}.items():
        logits = start.clone().requires_grad_()
        logps, kept = saved_bytes(lambda fn=fn, logits=logits: fn(logits, targets))
        logps.backward(grad)
        results[name] = logps.detach(), logits.grad, kept
    (new, new_grad, new_kept), (old, old_grad, old_kept) = results["new"], results["old"]
    assert new.dtype == old.dtype == torch.float32 and new_grad.dtype == dtype
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(new_grad, old_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)
    logits_bytes = start.numel() * start.element_size()
    assert new_kept < logits_bytes + 37 * 16  # the logits, the targets and the log-normaliser
    assert old_kept >= 37 * 1000 * 4  # cross_entropy's float32 log-softmax
    if dtype == torch.bfloat16:
        assert new_kept < 0.6 * old_kept

"""logprobs.sliding_window_logprob (smoke tier): exact when the text fits, every token once when not."""

from __future__ import annotations

import pytest
import torch

from ilrdpo.logprobs import sliding_window_logprob


def token_logp(model, context: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=context.unsqueeze(0)).logits[0, -1].double()
    return float(torch.log_softmax(logits, -1)[target])


@pytest.fixture
def text_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 6, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:60])  # (60,)


def test_equals_the_plain_log_likelihood_when_the_text_fits(tiny_model, text_ids):
    with torch.no_grad():
        logits = tiny_model(input_ids=text_ids.unsqueeze(0)).logits[0, :-1].double()
    plain = float(torch.log_softmax(logits, -1).gather(-1, text_ids[1:, None]).sum())
    total, n = sliding_window_logprob(tiny_model, text_ids, window=64, stride=16)
    assert n == 59 and total == pytest.approx(plain, abs=1e-3)


@pytest.mark.parametrize("window,stride", [(16, 8), (20, 19), (10, 1)])
def test_every_token_once_with_its_window_of_context(tiny_model, text_ids, window, stride):
    """Independently, token by token: token p belongs to the group k = (p-1) // stride, whose
    forward pass ends at stop = min(1 + (k+1) stride, T) and starts at max(0, stop - window)."""
    total, n = sliding_window_logprob(tiny_model, text_ids, window=window, stride=stride)
    T = len(text_ids)
    expected = 0.0
    for p in range(1, T):
        stop = min(1 + ((p - 1) // stride + 1) * stride, T)
        context = max(0, stop - window)
        assert p - context >= min(window - stride, p)  # at least window - stride tokens of context
        expected += token_logp(tiny_model, text_ids[context:p], int(text_ids[p]))
    assert n == T - 1
    assert total == pytest.approx(expected, abs=2e-3)


def test_stride_must_leave_context():
    with pytest.raises(ValueError, match="0 < stride < window"):
        sliding_window_logprob(None, torch.zeros(5, dtype=torch.long), window=8, stride=8)


@pytest.mark.parametrize("window,stride", [(64, 16), (16, 8)])
def test_answer_only_from_the_first_target(tiny_model, text_ids, window, stride):
    """first=P scores tokens P.. only, token p in group (p-P) // stride, each with its window."""
    first, T = 25, len(text_ids)
    total, n = sliding_window_logprob(tiny_model, text_ids, window=window, stride=stride, first=first)
    expected = 0.0
    for p in range(first, T):
        stop = min(first + ((p - first) // stride + 1) * stride, T)
        expected += token_logp(tiny_model, text_ids[max(0, stop - window):p], int(text_ids[p]))
    assert n == T - first and total == pytest.approx(expected, abs=2e-3)

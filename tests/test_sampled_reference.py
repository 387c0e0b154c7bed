"""Smoke tier: reference log-probs taken while sampling (ilrdpo.sampled_reference) against the
forward pass they replace, on the tiny Llama."""

from __future__ import annotations

import pytest
import torch

from ilrdpo.config import DataSettings, GenerationSettings, LossSettings, TrainSettings
from ilrdpo.data import tokenize_pairs
from ilrdpo.generation.sampling import generate_answers
from ilrdpo.logprobs import sequence_logps
from ilrdpo.records import PreferencePair, Prompt
from ilrdpo.sampled_reference import read_sample_logps, sampled_reference_logps, write_sample_logps
from ilrdpo.train import pair_reference_logps

PROMPTS = [Prompt(prompt="Why is the sky blue?", id="sky"), Prompt(prompt="Hi", id="hi"),
           Prompt(prompt="Name three yellow fruits, please.", id="fruits")]
DATA, TRAIN, LOSS = DataSettings(), TrainSettings(batch_size=2, max_length=128), LossSettings(type="ipo")


@pytest.mark.smoke
def test_a_samples_log_prob_equals_the_forward_pass_over_its_tokens(tiny_model, tokenizer):
    """Each sample's logp (summed while decoding, left-padded rows in one batch, KV cache) equals
    log pi(tokens | prompt) from one unpadded forward pass over prompt + the sampled ids, EOS
    included, to float32 tolerance."""
    gen = GenerationSettings(num_samples=3, max_new_tokens=12, temperature=1.0, batch_size=9, backend="compact")
    samples = generate_answers(tiny_model, tokenizer, PROMPTS, gen, DATA, num_samples=3, seed=4, keep_logps=True)
    checked = 0
    for prompt in PROMPTS:
        for sample in samples[prompt.id]:
            ids = torch.tensor([sample.prompt_ids + sample.token_ids])  # (1, T)
            response = torch.zeros_like(ids)
            response[0, len(sample.prompt_ids):] = 1
            with torch.no_grad():
                forward, _ = sequence_logps(tiny_model, ids, torch.ones_like(ids), response)
            assert sample.logp == pytest.approx(float(forward[0]), rel=1e-5, abs=1e-4)
            checked += 1
    assert checked == 9


@pytest.mark.smoke
def test_pairs_take_sampled_log_probs_where_tokens_agree_and_forward_the_rest(tiny_model, tokenizer, tmp_path):
    """Records whose ids are what train_round's tokenisation gives are used as they are (their
    logp values, set here to -1 and -2, come back unchanged); a pair whose rejected answer was
    sampled as other ids (a re-tokenised text that differs) is forwarded, equal to
    pair_reference_logps; an answer with no record at all likewise."""
    pairs = [PreferencePair(prompt=p.prompt, chosen=f"Answer one to {p.id}.", rejected=f"Two, {p.id}!")
             for p in PROMPTS]
    examples = tokenize_pairs(tokenizer, pairs, max_length=TRAIN.max_length, use_chat_template=DATA.use_chat_template,
                              system_prompt=DATA.system_prompt)

    class Drawn:  # what generate_answers returns per answer, with keep_logps
        def __init__(self, text, prompt_ids, token_ids, logp):
            self.text, self.prompt_ids, self.token_ids, self.logp = text, prompt_ids, token_ids, logp

    samples = {p.id: [Drawn(pair.chosen, e.prompt_ids, e.chosen_ids, -1.0),
                      Drawn(pair.rejected, e.prompt_ids, e.rejected_ids if p.id != "hi" else e.rejected_ids[1:], -2.0)]
               for p, pair, e in zip(PROMPTS, pairs, examples)}
    path = tmp_path / "sample_logps.jsonl"
    assert write_sample_logps(path, PROMPTS, samples)
    sampled = read_sample_logps(path)
    out, forwarded = sampled_reference_logps(tiny_model, tokenizer, pairs, sampled, LOSS, TRAIN, DATA)
    full = pair_reference_logps(tiny_model, tokenizer, pairs, LOSS, TRAIN, DATA)
    assert forwarded == 1
    assert out[0].tolist() == [-1.0, -2.0] and out[2].tolist() == [-1.0, -2.0]
    assert out[1].tolist() == pytest.approx(full[1].tolist(), rel=1e-6)
    del sampled[next(iter(sampled))]  # the first prompt's chosen answer: no record
    out, forwarded = sampled_reference_logps(tiny_model, tokenizer, pairs, sampled, LOSS, TRAIN, DATA)
    assert forwarded == 2 and out[0].tolist() == pytest.approx(full[0].tolist(), rel=1e-6)


@pytest.mark.smoke
def test_nothing_is_written_when_the_samples_carry_no_log_probs(tmp_path, tiny_model, tokenizer):
    """The hf backend keeps no log-probs: no sample_logps.jsonl, so the train stage forwards every pair."""
    gen = GenerationSettings(num_samples=2, max_new_tokens=4, batch_size=4, backend="hf")
    samples = generate_answers(tiny_model, tokenizer, PROMPTS, gen, DATA, num_samples=2, seed=0, keep_logps=True)
    assert not write_sample_logps(tmp_path / "s.jsonl", PROMPTS, samples)
    assert not (tmp_path / "s.jsonl").exists() and read_sample_logps(tmp_path / "s.jsonl") == {}

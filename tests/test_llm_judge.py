"""The LLM judge (AlpacaEval's pairwise protocol over chat completions) against a local server in
the test that judges like a real scorer (the longer answer wins, char_count's preference): the
preference from label log-probs, else from the text, unparseable answers counted, both orders and
the randomised order, the cache keyed by the exact request, and faults in one line."""

from __future__ import annotations

import json
import math

import pytest

from helpers.http_server import LocalServer, ok
from ilrdpo.evaluation.winrate import win_rates
from ilrdpo.records import Prompt
from ilrdpo.scoring.llm_judge import PairwiseJudge, label_probability
from ilrdpo.serving import client as client_module
from ilrdpo.serving.client import Client, ServerError

pytestmark = pytest.mark.unit

PROMPTS = [Prompt(prompt=f"Question {i}?", id=f"q{i}") for i in range(6)]
ANSWERS = ["a much longer answer", "short", "a long answer here", "x", "medium one", "tiny"]
BASELINE = ["mid answer"] * 6


def outputs(body) -> tuple[str, str]:
    user = body["messages"][1]["content"]
    lines = [json.loads(line)["output"] for line in user.splitlines() if line.startswith('{"model_identifier"')]
    return lines[0], lines[1]


def length_judge(with_logprobs: bool = True, text=None):
    """Prefers the longer output: P(M) = sigmoid(len(M) - len(m)) in log-probs, or the label as text."""
    def answer(path, body):
        assert path == "/v1/chat/completions" and body["max_tokens"] == 1 and body["top_logprobs"] == 5
        first, second = outputs(body)
        p_second = 1 / (1 + math.exp(-(len(second) - len(first)) / 4))
        label = "M" if p_second >= 0.5 else "m"
        choice = {"index": 0, "message": {"role": "assistant", "content": text or label}, "finish_reason": "length"}
        if with_logprobs:
            choice["logprobs"] = {"content": [{"token": label, "logprob": math.log(max(p_second, 1 - p_second)),
                                               "top_logprobs": [{"token": "M", "logprob": math.log(p_second)},
                                                                {"token": "m", "logprob": math.log(1 - p_second)},
                                                                {"token": "The", "logprob": -9.0}]}]}
        return ok({"choices": [choice]})

    return answer


def expected(answer: str, baseline: str) -> float:
    return 1 / (1 + math.exp(-(len(answer) - len(baseline)) / 4))


@pytest.mark.parametrize("order", ["random", "both"])
def test_preferences_from_label_logprobs_in_either_order_and_cached(tmp_path, order):
    with LocalServer(length_judge()) as server:
        judge = PairwiseJudge(Client(server.url, 5), "judge-model", tmp_path / "judge_cache.jsonl", order=order)
        result = judge.judge(PROMPTS, ANSWERS, BASELINE, seed=3)
        asked = len(server.requests)
        again = PairwiseJudge(Client(server.url, 5), "judge-model", tmp_path / "judge_cache.jsonl", order=order)
        assert again.judge(PROMPTS, ANSWERS, BASELINE, seed=3) == result
        assert len(server.requests) == asked and again.asked == 0  # a rerun costs nothing
    assert result.unparseable == 0 and asked == len(PROMPTS) * (2 if order == "both" else 1)
    assert result.preferences == pytest.approx([expected(a, b) for a, b in zip(ANSWERS, BASELINE)])
    firsts = [outputs(body)[0] for _, body, _ in server.requests]
    if order == "random":  # the model's answer is shown first for some prompts and second for others
        assert 0 < sum(f in ANSWERS for f in firsts) < len(PROMPTS)
    assert all(body["model"] == "judge-model" for _, body, _ in server.requests)


def test_without_logprobs_the_label_is_parsed_and_other_text_counted(tmp_path):
    with LocalServer(length_judge(with_logprobs=False)) as server:
        result = PairwiseJudge(Client(server.url, 5), None, tmp_path / "c.jsonl").judge(PROMPTS, ANSWERS, BASELINE)
    assert result.preferences == [round(expected(a, b)) for a, b in zip(ANSWERS, BASELINE)]
    with LocalServer(length_judge(with_logprobs=False, text="Both are fine.")) as server:
        result = PairwiseJudge(Client(server.url, 5), None, tmp_path / "d.jsonl").judge(PROMPTS, ANSWERS, BASELINE)
    assert result.preferences == [None] * 6 and result.unparseable == 6


def test_preferences_give_win_rates_as_any_judges_do(tmp_path):
    with LocalServer(length_judge()) as server:
        prefs = PairwiseJudge(Client(server.url, 5), None, tmp_path / "c.jsonl").judge(
            PROMPTS, ANSWERS, BASELINE).preferences
    rates = win_rates(prefs, [len(a) for a in ANSWERS], [len(b) for b in BASELINE], n_boot=50)
    assert rates["win_rate"] == pytest.approx(100 * sum(prefs) / len(prefs))  # in percent
    assert "lc_win_rate" in rates


def test_faults_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(client_module, "RETRY_DELAYS_S", (0.05,))
    with LocalServer(lambda p, b: (503, "{}")) as server, pytest.raises(ServerError, match="HTTP 503"):
        PairwiseJudge(Client(server.url, 5, what="eval.judge.url"), None, tmp_path / "c.jsonl").judge(
            PROMPTS[:1], ANSWERS[:1], BASELINE[:1])
    with LocalServer(lambda p, b: ok({"error": "no"})) as server, \
            pytest.raises(ServerError, match=r"/v1/chat/completions: the answer holds no choices"):
        PairwiseJudge(Client(server.url, 5), None, tmp_path / "d.jsonl").judge(PROMPTS[:1], ANSWERS[:1], BASELINE[:1])
    assert label_probability({"choices": [{"message": {"content": "m"}}]}) == 0.0


@pytest.mark.smoke
def test_a_run_with_an_llm_judge_reports_its_win_rates_and_a_rerun_asks_nothing(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    import yaml

    from helpers import SCORER, call_main

    for name, texts in (("p.jsonl", ["Name a colour.", "Say hello.", "What is 2 + 2?"]),
                        ("e.jsonl", ["What is ice?", "Name a planet.", "Why is the sky blue?"])):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": t, "id": f"{name[0]}{i}"}) + "\n"
                                             for i, t in enumerate(texts)))
    with LocalServer(length_judge()) as server:
        config = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
                  "data": {"prompts": str(tmp_path / "p.jsonl"), "eval_prompts": str(tmp_path / "e.jsonl")},
                  "generation": {"num_samples": 2, "max_new_tokens": 6, "temperature": 1.0, "batch_size": 4},
                  "scoring": {"type": "python", "function": f"{SCORER}:char_count"},
                  "pairing": {"skip_truncated": False},
                  "train": {"batch_size": 2, "learning_rate": 1e-3, "max_length": 64},
                  "iterations": {"count": 1},
                  "eval": {"length_anchors": False, "judge": {"type": "llm", "url": server.url, "model": "judge"}},
                  "output_dir": str(tmp_path / "run")}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        assert call_main(monkeypatch, ["run", "--config", str(tmp_path / "c.yaml")]) == 0
        asked = len(server.requests)
        result = json.loads((tmp_path / "run" / "iter_1" / "eval.json").read_text())["vs_initial_llm"]
        # the same evaluation again: every annotation comes from the cache
        written = (tmp_path / "run" / "iter_1" / "eval.json").stat().st_mtime_ns
        assert call_main(monkeypatch, ["run", "--config", str(tmp_path / "c.yaml"), "--redo", "1:eval"]) == 0
        assert (tmp_path / "run" / "iter_1" / "eval.json").stat().st_mtime_ns != written
        assert len(server.requests) == asked == 3
    assert result["judged"] == 3 and result["unparseable"] == 0 and 0 <= result["win_rate"] <= 100
    assert "lc_win_rate" in result and (tmp_path / "run" / "iter_1" / "llm_judge.jsonl").exists()

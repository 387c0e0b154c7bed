"""Sampling through an OpenAI-compatible server (generation.backend: server): the HTTP client's
retries and one-line errors against a local server in the test (unit), the sampler's requests
(smoke), $OPENAI_API_KEY through a run's three clients and in no file (smoke), a started server
awaited while it lives (slow), and whole runs against a real `transformers serve` on the tiny model
(slow): a server started per round on that round's model, a command that fails to start, a server
killed mid-stage."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers import call_main, console_script, read_jsonl, shared_folder
from helpers.http_server import LocalServer, ok
from ilrdpo.config import DataSettings, GenerationSettings, load_config
from ilrdpo.errors import UserInputError
from ilrdpo.generation import generate_answers
from ilrdpo.generation.server import ServerSampler, load_adapter, needs_merged_weights, sample_from_server
from ilrdpo.preflight import check_server
from ilrdpo.records import Prompt
from ilrdpo.serving import client as client_module
from ilrdpo.serving import process as process_module
from ilrdpo.serving.client import Client, ServerError
from ilrdpo.serving.process import direct_argv, free_port, render_command, started_server, stop

TESTS = Path(__file__).resolve().parent
SCORER = TESTS / "helpers" / "scorer.py"
TRANSFORMERS = Path(sys.executable).parent / "transformers"
SERVE = f"{TRANSFORMERS} serve {{model}} --port {{port}} --device cpu --log-level warning"
needs_serve = pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or not TRANSFORMERS.exists(),
                                 reason="needs `transformers serve`: pip install 'ilrdpo[serving]'")
PROMPTS = ["What is the capital of France?", "Name a colour.", "What do bees make?", "Say hello."]
FAST = (0.05, 0.05)  # retry waits of the tests' clients


# --- the client (unit) ---------------------------------------------------------------------------


def scripted(*answers):
    """answer() that gives the listed (status, text) in turn, then the last one again."""
    queue = list(answers)
    return lambda path, body: queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.mark.unit
def test_client_retries_429_and_5xx_then_returns_the_answer():
    with LocalServer(scripted((503, "{}"), (429, "{}"), ok({"x": 1}))) as server:
        assert Client(server.url, 5, delays=FAST).post("/v1/completions", {}) == {"x": 1}
        assert len(server.requests) == 3


@pytest.mark.unit
def test_client_gives_up_in_one_line_naming_url_and_status():
    with LocalServer(scripted((500, json.dumps({"detail": "CUDA out of memory"})))) as server, \
            pytest.raises(ServerError) as error:
        Client(server.url + "/v1/", 5, what="scoring.url", delays=FAST).post("/v1/completions", {})
    message = str(error.value)
    assert message.startswith(f"scoring.url {server.url}/v1/completions: HTTP 500 (CUDA out of memory) after 3 tries")
    assert "\n" not in message and len(server.requests) == 3


@pytest.mark.unit
def test_client_does_not_retry_a_refused_request():
    with LocalServer(scripted((422, json.dumps({"detail": "Unexpected fields: {'top_k'}"})))) as server:
        with pytest.raises(ServerError, match=r"HTTP 422: Unexpected fields: \{'top_k'\}$"):
            Client(server.url, 5, delays=FAST).post("/v1/completions", {})
        assert len(server.requests) == 1


@pytest.mark.unit
def test_client_timeout_connection_refused_and_malformed_json_are_one_line():
    def slow(path, body):
        time.sleep(1.0)
        return ok({})

    with LocalServer(slow) as server, pytest.raises(ServerError, match=r"no answer within 0.2 s after 2 tries"):
        Client(server.url, 0.2, delays=FAST[:1]).get("/v1/models")
    with pytest.raises(ServerError, match=r"cannot connect \(.*\) after 3 tries; run the same command again"):
        Client(f"http://127.0.0.1:{free_port()}", 1, delays=FAST).get("/v1/models")
    with LocalServer(scripted((200, "{not json"))) as server, pytest.raises(ServerError, match="is not JSON"):
        Client(server.url, 1).get("/v1/models")


@pytest.mark.unit
def test_openai_api_key_is_sent_as_a_bearer_token_and_unset_sends_none(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "s3cret")
    with LocalServer(scripted(ok({}))) as server:
        Client(server.url, 1).get("/v1/models")
        monkeypatch.delenv("OPENAI_API_KEY")
        Client(server.url, 1).get("/v1/models")
        monkeypatch.setenv("OPENAI_API_KEY", "")
        Client(server.url, 1).get("/v1/models")
    assert server.requests[0][2]["Authorization"] == "Bearer s3cret"
    assert ["Authorization" in headers for _, _, headers in server.requests] == [True, False, False]


@pytest.mark.unit
@pytest.mark.parametrize("key", ["generation.server.api_key_env", "scoring.api_key_env", "eval.judge.api_key_env",
                                 "generation.server.timeout"])
def test_the_removed_server_keys_are_one_line_with_exit_2(key, tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"generation": {"backend": "server", "server": {"url": "http://h:1"}},
                                      "output_dir": str(tmp_path / "run")}))
    assert call_main(monkeypatch, ["run", "--config", str(config), f"{key}=MY_KEY"]) == 2
    use = "$OPENAI_API_KEY (the key for every server the config names)" if "api_key" in key else \
        "nothing: a started server is waited for while its process lives, an answer up to 600 s"
    assert capsys.readouterr().err == f"error: command line: config key '{key}' was removed; use {use}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_a_command_without_shell_syntax_runs_without_a_shell():
    """So that the server is ilrdpo's own child and gets the parent-death signal (a shell that
    forks it would leave it running after a SIGKILL of the run)."""
    template = "CUDA_VISIBLE_DEVICES=1 vllm serve {model} --port {port}"
    assert direct_argv(template, render_command(template, "/runs/my run/iter_1/model", 8001)) == (
        ["vllm", "serve", "/runs/my run/iter_1/model", "--port", "8001"], {"CUDA_VISIBLE_DEVICES": "1"})
    assert direct_argv("a {model} {port} && b", "a m 1 && b") == (None, {})


# --- a started server: awaited while it lives (slow: a process) ---------------------------------


@pytest.mark.slow
def test_a_started_server_is_awaited_while_it_lives_with_a_line_now_and_then(tmp_path, monkeypatch, capsys):
    """No time limit on loading (a large model takes minutes): a line every WAIT_REPORT_S seconds
    saying what is awaited, for how long so far, and where the output goes; ready on a 200."""
    monkeypatch.setattr(process_module, "WAIT_REPORT_S", 0.3)
    (tmp_path / "www" / "v1").mkdir(parents=True)
    (tmp_path / "www" / "v1" / "models").write_text('{"data": [{"id": "m"}]}')
    serve = f"sleep 1.5; exec {sys.executable} -m http.server {{port}} --bind 127.0.0.1 --directory {tmp_path / 'www'}"
    log = tmp_path / "server.log"
    with started_server(serve + " # {model}", "m", log) as url:
        assert Client(url, 5).get("/v1/models") == {"data": [{"id": "m"}]}
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith(f"waiting for generation.server.command to answer {url}/v1/models: ")
                                   and line.endswith(f" s so far (no connection yet; its output: {log})")
                                   for line in lines)


@pytest.mark.slow
def test_a_started_server_that_exits_while_awaited_is_one_line_naming_its_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(process_module, "WAIT_REPORT_S", 0.3)
    log = tmp_path / "server.log"
    start = time.monotonic()
    with pytest.raises(ServerError) as error, started_server("echo loading {model} on {port}; sleep 1.2; exit 3",
                                                             "m", log):
        pytest.fail("the server never answered")
    assert time.monotonic() - start < 10  # as soon as it exits
    message = str(error.value)
    assert message.startswith(f"generation.server.command exited with status 3 before it answered ({log}): ")
    assert re.search(r"\| loading m on \d+$", message) and "\n" not in message
    assert "waiting for generation.server.command" in capsys.readouterr().err


@pytest.mark.slow
def test_a_started_server_refusing_the_key_is_one_line(tmp_path, monkeypatch):
    """A server started with --api-key answers 401 until $OPENAI_API_KEY is its key: said at once,
    not awaited for ever."""
    process = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        with LocalServer(scripted((401, json.dumps({"error": "Unauthorized"})))) as server:
            monkeypatch.delenv("OPENAI_API_KEY", raising=False)
            with pytest.raises(ServerError, match=r"/v1/models: HTTP 401: \$OPENAI_API_KEY is not set \("):
                process_module._wait_ready(process, server.url, tmp_path / "server.log")
            monkeypatch.setenv("OPENAI_API_KEY", "wrong")
            with pytest.raises(ServerError, match=r"HTTP 401: \$OPENAI_API_KEY is not the server's key"):
                process_module._wait_ready(process, server.url, tmp_path / "server.log")
            assert server.requests[-1][2]["Authorization"] == "Bearer wrong"
    finally:
        stop(process)


# --- config and preflight (unit) -----------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    ([], "needs one of generation.server.command"),
    (["generation.server.command=vllm serve {model}"], "must hold {model} and {port}"),
])
def test_server_settings_are_checked_in_one_line(overrides, message):
    with pytest.raises(UserInputError, match=message):
        load_config(None, ["generation.backend=server", *overrides])


@pytest.mark.unit
def test_a_fixed_server_is_refused_where_rounds_would_not_be_on_policy():
    url = ["generation.backend=server", "generation.server.url=http://h:8000"]
    with pytest.raises(UserInputError, match="'generation.server.url': a server you run keeps its weights"):
        check_server(load_config(None, [*url, "iterations.count=2"]))
    check_server(load_config(None, [*url, "iterations.count=1"]))  # one round samples the initial model
    check_server(load_config(None, [*url, "iterations.count=2", "model.lora.r=8"]))  # adapters loaded per round


@pytest.mark.unit
def test_a_lora_run_saves_merged_weights_only_for_a_server_started_per_round():
    """model.merge_lora is gone: a server started per round loads whole weights, so each round's
    adapter is also saved merged (preflight used to refuse LoRA with a server command); a running
    server loads the adapter, and in-process sampling needs neither."""
    command = ["generation.backend=server", "generation.server.command=vllm serve {model} --port {port}"]
    config = load_config(None, [*command, "model.lora.r=8"])
    check_server(config)
    assert needs_merged_weights(config)
    assert not needs_merged_weights(load_config(None, command))
    assert not needs_merged_weights(load_config(None, ["model.lora.r=8"]))
    url = ["generation.backend=server", "generation.server.url=http://h:8000", "model.lora.r=8"]
    assert not needs_merged_weights(load_config(None, url))


# --- the sampler's requests (smoke: the real tokenizer) ------------------------------------------


def test_sampler_asks_again_with_seeds_where_the_server_ignores_n(tokenizer, tmp_path):
    def one_choice(path, body):
        return ok({"choices": [{"index": 0, "text": f" seed {body['seed']} ", "finish_reason": "length"}]})

    settings = GenerationSettings(num_samples=3, max_new_tokens=5, temperature=0.7, top_k=4, batch_size=6)
    prompts = [Prompt(prompt=p, id=f"p{i}") for i, p in enumerate(PROMPTS[:2])]
    with LocalServer(one_choice) as server:
        sampler = ServerSampler(Client(server.url, 5), "m", settings, [], greedy=False)
        samples = sample_from_server(sampler, tokenizer, prompts, DataSettings(), context=512, num_samples=3,
                                     seed=7, progress_file=tmp_path / "progress.jsonl")
        bodies = [body for _, body, _ in server.requests]
    first = 7 * 1_000_003
    assert [s.text for s in samples["p0"]] == [f"seed {first}", f"seed {first + 1}", f"seed {first + 2}"]
    assert all(s.truncated and s.n_tokens == len(tokenizer(s.text, add_special_tokens=False)["input_ids"])
               for s in samples["p1"])
    # asked for 3 once per prompt; every later request asks for one answer
    # 3 answers asked for at once first; once a server is seen to ignore n, one request per answer
    assert len(bodies) == 6 and bodies[0]["n"] == 3 and sum(b["n"] == 1 for b in bodies) >= 4
    assert all(b["temperature"] == 0.7 and b["top_k"] == 4 and b["max_tokens"] == 5 and "top_p" not in b
               for b in bodies)
    text = bodies[0]["prompt"]  # the chat template's text, which the tokenizer reads back to the same ids
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert {row["id"] for row in read_jsonl(tmp_path / "progress.jsonl")} == {"p0", "p1"}


def test_sampler_takes_n_answers_from_one_request_where_the_server_returns_them(tokenizer):
    def n_choices(path, body):
        return ok({"choices": [{"index": i, "text": f"answer {i}", "finish_reason": "stop"}
                               for i in reversed(range(body["n"]))]})

    with LocalServer(n_choices) as server:
        sampler = ServerSampler(Client(server.url, 5), "m", GenerationSettings(num_samples=4), [], greedy=False)
        samples = sample_from_server(sampler, tokenizer, [Prompt(prompt="Hi", id="a")], DataSettings(),
                                     context=None, num_samples=4, seed=0, progress_file=None)
        assert len(server.requests) == 1
    assert [s.text for s in samples["a"]] == [f"answer {i}" for i in range(4)]
    assert not any(s.truncated for s in samples["a"])


def test_sampler_reports_an_answer_without_choices_in_one_line(tokenizer):
    with LocalServer(scripted(ok({"object": "error"}))) as server:
        sampler = ServerSampler(Client(server.url, 5), "m", GenerationSettings(num_samples=1), [], greedy=True)
        with pytest.raises(ServerError, match=r"/v1/completions: the answer holds no choices with text"):
            sample_from_server(sampler, tokenizer, [Prompt(prompt="Hi", id="a")], DataSettings(), context=None,
                               num_samples=1, seed=0, progress_file=None)


@pytest.mark.unit
def test_a_rounds_lora_adapter_is_loaded_into_a_running_server():
    """vLLM's runtime LoRA loading: the adapter's path under a name the round's requests carry; an
    adapter already loaded (a resumed round) is fine, any other refusal is one line."""
    def vllm(path, body):
        if body["lora_path"] == "/runs/r/iter_1/model":
            return 200, "Success: LoRA adapter added successfully."  # vLLM answers in plain text
        if body["lora_path"] == "/runs/r/iter_2/model":
            return 400, json.dumps({"message": f"The lora adapter '{body['lora_name']}' has already been loaded."})
        return 400, json.dumps({"message": "LoRA is not enabled (--enable-lora)"})

    with LocalServer(vllm) as server:
        client = Client(server.url, 5)
        name = load_adapter(client, "/runs/r/iter_1/model", 1)
        assert server.requests[0][:2] == ("/v1/load_lora_adapter", {"lora_name": name,
                                                                   "lora_path": "/runs/r/iter_1/model"})
        assert load_adapter(client, "/runs/r/iter_2/model", 2).startswith("ilrdpo-iter2-")
        with pytest.raises(ServerError, match=r"HTTP 400: LoRA is not enabled \(--enable-lora\)$"):
            load_adapter(client, "/elsewhere", 3)


# --- the API key: every server's, never written (smoke: a run on the tiny model) -----------------


def every_endpoint(path, body):
    """A sampling server, a reward model's /pooling and a chat judge in one: answers of 1..n words,
    scored by their length, the judge preferring the first output shown."""
    if path == "/v1/models":
        return ok({"data": [{"id": "served"}]})
    if path == "/v1/completions":
        return ok({"choices": [{"index": i, "text": " word" * (i + 1), "finish_reason": "stop"}
                               for i in range(body["n"])]})
    if path == "/pooling":
        return ok({"scores": [float(len(text)) for text in body["input"]]})
    assert path == "/v1/chat/completions"
    return ok({"choices": [{"index": 0, "message": {"role": "assistant", "content": "m"}}]})


def test_openai_api_key_reaches_every_server_and_no_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """One run through the three clients (sampling server, remote scorer, LLM judge): each request
    carries $OPENAI_API_KEY as its bearer token, and neither the run directory (config.yaml,
    caches, logs) nor the console holds the key."""
    secret = "sk-test-7f3a9c-never-written"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with LocalServer(every_endpoint) as server:
        _config, out = write_run(tmp_path, tiny_model_dir, iterations=1, server={"url": server.url})
        config = yaml.safe_load(_config.read_text())
        config["scoring"] = {"type": "remote", "url": f"{server.url}/pooling"}
        config["data"]["eval_prompts"] = config["data"]["prompts"]
        config["eval"] = {"length_anchors": False, "judge": {"type": "llm", "url": server.url, "model": "judge"}}
        _config.write_text(yaml.safe_dump(config))
        assert call_main(monkeypatch, ["run", "--config", str(_config)]) == 0
        requests = list(server.requests)
    assert {path for path, _, _ in requests} == {"/v1/models", "/v1/completions", "/pooling", "/v1/chat/completions"}
    assert all(headers["Authorization"] == f"Bearer {secret}" for _, _, headers in requests)
    assert json.loads((out / "iter_1" / "eval.json").read_text())["vs_initial_llm"]["judged"] == len(PROMPTS)
    written = [path for path in tmp_path.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]
    assert written == []
    assert secret not in "".join(capsys.readouterr())


# --- a real server: `transformers serve` on the tiny model ----------------------------------------


@pytest.fixture(scope="module")
def served_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model, with do_sample in its generation_config.json: `transformers serve` samples
    only where the model's config says so (it decodes greedily otherwise, whatever the temperature)."""
    def build(folder: Path) -> None:
        shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
        config = json.loads((folder / "generation_config.json").read_text())
        (folder / "generation_config.json").write_text(json.dumps({**config, "do_sample": True}))

    return shared_folder(tmp_path_factory, "served_tiny_llama", build)


def run_config(model: Path, out: Path, prompts: Path, **generation) -> dict:
    return {
        "model": {"name_or_path": str(model), "dtype": "float32"},
        "data": {"prompts": str(prompts)},
        "generation": {"num_samples": 2, "max_new_tokens": 8, "temperature": 1.0, "batch_size": 4,
                       "backend": "server", **generation},
        "scoring": {"type": "python", "function": f"{SCORER}:char_count"},
        "pairing": {"skip_truncated": False},
        "train": {"batch_size": 2, "learning_rate": 1e-3, "epochs": 1, "warmup_ratio": 0.0, "max_length": 128},
        "iterations": {"count": 2},
        "output_dir": str(out),
    }


def write_run(tmp_path: Path, model: Path, iterations: int = 2, **generation) -> tuple[Path, Path]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": f"t{i}"}) + "\n" for i, p in enumerate(PROMPTS)))
    config = run_config(model, tmp_path / "run", prompts, **generation)
    config["iterations"]["count"] = iterations
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "config.yaml", tmp_path / "run"


def local_greedy(model_dir: Path, prompts: list[Prompt]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    answers = generate_answers(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8), DataSettings(),
                               num_samples=1, seed=0, greedy=True)
    return [answers[p.id][0].text for p in prompts]


@pytest.mark.slow
@needs_serve
def test_each_round_samples_through_a_server_started_on_the_previous_rounds_model(
        served_model_dir, tmp_path, monkeypatch, tokenizer):
    config, out = write_run(tmp_path, served_model_dir, server={"command": SERVE})
    assert call_main(monkeypatch, ["run", "--config", str(config)]) == 0
    first_lines = [(out / f"iter_{t}" / "server.log").read_text().splitlines()[0] for t in (1, 2)]
    assert f"serve {served_model_dir} --port" in first_lines[0]
    assert f"serve {out / 'iter_1' / 'model'} --port" in first_lines[1]
    assert all(len(c["responses"]) == 2 for c in read_jsonl(out / "iter_2" / "candidates.jsonl"))
    assert not (out / "iter_2" / "generation.partial.jsonl").exists()
    # the server the round started on iteration 1's model answers as that model does in-process
    prompts = [Prompt(prompt=p, id=f"t{i}") for i, p in enumerate(PROMPTS)]
    iteration_1 = out / "iter_1" / "model"
    with started_server(SERVE, str(iteration_1), tmp_path / "greedy.log") as url:
        client = Client(url, 60)
        sampler = ServerSampler(client, str(iteration_1), GenerationSettings(max_new_tokens=8), [], greedy=True)
        served = sample_from_server(sampler, tokenizer, prompts, DataSettings(), context=512, num_samples=1,
                                    seed=0, progress_file=None)
    assert [served[p.id][0].text for p in prompts] == local_greedy(iteration_1, prompts)


@pytest.mark.slow
@needs_serve
def test_a_lora_run_serves_each_rounds_merged_weights(served_model_dir, tmp_path, monkeypatch):
    """model.lora with a server started per round: each round saves its adapter and, for the
    server, the adapter merged (no model.merge_lora); round 2's server loads iteration 1's merged
    weights."""
    config, out = write_run(tmp_path, served_model_dir, server={"command": SERVE})
    raw = yaml.safe_load(config.read_text())
    raw["model"]["lora"] = {"r": 4, "lora_dropout": 0.0}
    config.write_text(yaml.safe_dump(raw))
    assert call_main(monkeypatch, ["run", "--config", str(config)]) == 0
    saved = out / "iter_1" / "model"
    assert (saved / "adapter_config.json").is_file() and (saved / "merged" / "model.safetensors").is_file()
    assert f"serve {saved / 'merged'} --port" in (out / "iter_2" / "server.log").read_text().splitlines()[0]
    assert all(len(c["responses"]) == 2 for c in read_jsonl(out / "iter_2" / "candidates.jsonl"))


def test_a_server_command_that_fails_to_start_is_one_line_with_its_output(tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    command = "echo loading {model} on {port}; echo 'CUDA error: no device' >&2; exit 3"
    config, _out = write_run(tmp_path, tiny_model_dir, server={"command": command})
    assert call_main(monkeypatch, ["run", "--config", str(config)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: generation.server.command exited with status 3 before it answered")
    assert lines[-1].endswith("CUDA error: no device")


@pytest.mark.slow
@needs_serve
def test_a_server_killed_mid_stage_gives_retries_then_a_line_and_the_stage_resumes(
        served_model_dir, tmp_path, monkeypatch, capsys):
    port = free_port()
    command = SERVE.format(model=served_model_dir, port=port).split()
    config, out = write_run(tmp_path, served_model_dir, iterations=1, batch_size=2,
                            server={"url": f"http://127.0.0.1:{port}/v1"})
    monkeypatch.setattr(client_module, "RETRY_DELAYS_S", FAST)
    progress = out / "iter_1" / "generation.partial.jsonl"

    def serve(log: Path) -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        client = Client(f"http://127.0.0.1:{port}", 5, delays=(0.5,) * 120)
        client.get("/v1/models")  # up to a minute to start
        return process

    server = serve(tmp_path / "first.log")

    def kill_after_first_prompt() -> None:
        while not (progress.exists() and progress.read_text().count("\n") >= 1):
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_prompt, daemon=True)
    killer.start()
    try:
        assert call_main(monkeypatch, ["run", "--config", str(config)]) == 1
    finally:
        killer.join(5)
        server.wait(10)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: generation.server.url http://127.0.0.1:{port}/v1/completions: ")
    assert line.endswith("after 3 tries; run the same command again when it answers: finished prompts are kept")
    kept = {row["id"] for row in read_jsonl(progress)}
    assert 1 <= len(kept) < len(PROMPTS)

    server = serve(tmp_path / "second.log")
    try:
        assert call_main(monkeypatch, ["run", "--config", str(config)]) == 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    asked = (tmp_path / "second.log").read_text().count("POST /v1/completions")
    assert asked == 2 * (len(PROMPTS) - len(kept))  # `transformers serve` ignores n: one request per answer
    assert [c["id"] for c in read_jsonl(out / "iter_1" / "candidates.jsonl")] == [f"t{i}" for i in range(4)]


@pytest.mark.slow
@needs_serve
def test_sigkill_mid_stage_takes_the_server_down_and_the_stage_resumes(served_model_dir, tmp_path, monkeypatch):
    config, out = write_run(tmp_path, served_model_dir, iterations=1, batch_size=2, server={"command": SERVE})
    env = {**os.environ, "ILRDPO_WAIT": "generation.partial.jsonl:2"}
    process = subprocess.Popen([*console_script(), "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in process.stderr:  # held after the second finished prompt, inside the stage
            if "waiting after write 2 of generation.partial.jsonl" in line:
                break
        else:
            pytest.fail(f"the run ended before its second prompt (status {process.wait()})")
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    port = (out / "iter_1" / "server.log").read_text().splitlines()[0].split("--port ")[1].split()[0]
    gone = Client(f"http://127.0.0.1:{port}", 2, delays=(0.5,) * 40)  # the kernel's SIGTERM stops the server
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            gone.get("/v1/models", retry=False)
        except ServerError:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the server on port {port} outlived the killed run")
    assert len(read_jsonl(out / "iter_1" / "generation.partial.jsonl")) == 2
    assert call_main(monkeypatch, ["run", "--config", str(config)]) == 0
    first, resumed = (out / "iter_1" / "server.log").read_text().split("\n$ ")  # one start each, appended
    # two prompts finished before the kill (a third may have been asked while the writer was held);
    # the resumed stage asks only for the two prompts not in the progress file
    assert first.count("POST /v1/completions") >= 2 * 2
    assert resumed.count("POST /v1/completions") == 2 * 2
    assert [c["id"] for c in read_jsonl(out / "iter_1" / "candidates.jsonl")] == [f"t{i}" for i in range(4)]

"""The sampling stage through an OpenAI-compatible server (generation.backend: server).

Each prompt is rendered with the policy's own chat template (generation.encode_prompts, as the
in-process backends do) and sent to /v1/completions: as text where the tokenizer reads that text
back to the same token ids (every server takes text), else as the token ids themselves (vLLM and
SGLang take them), so the server sees the tokens training will see. N answers come from one
request with `n` where the server returns N choices, else from N requests seeded apart (servers
such as `transformers serve` ignore `n`). Truncation is finish_reason "length"; an answer's length
is the tokenisation of its text (data.count_tokens, the length of any text from outside).

Prompts are in flight together up to generation.batch_size answers; each finished prompt is
appended to the stage's progress file, so a killed stage asks only for the rest. A prompt's seed
depends on the run's seed and its place in the prompt file, not on what ran before.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ilrdpo import distributed
from ilrdpo.config import DataSettings, GenerationSettings
from ilrdpo.data import count_tokens
from ilrdpo.generation.sampling import Sample, encode_prompts
from ilrdpo.progress import progress_bar
from ilrdpo.records import Prompt
from ilrdpo.serving.client import Client, ServerError
from ilrdpo.serving.process import started_server


def stop_token_ids(path: str, tokenizer) -> list[int]:
    """End-of-answer ids the server would not stop at on its own: the tokenizer's EOS, where the
    model's generation_config.json (which servers read) does not list it (sent as vLLM's and
    SGLang's `stop_token_ids`; in-process decoding stops at both)."""
    try:
        config = json.loads((Path(path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    model_eos = config.get("eos_token_id")
    model_eos = set(model_eos if isinstance(model_eos, list) else [model_eos])
    return [] if tokenizer.eos_token_id in model_eos else [tokenizer.eos_token_id]


def served_model(client: Client) -> str:
    """The first model GET /v1/models lists (the name requests must carry)."""
    listing = client.get("/v1/models")
    try:
        return str(listing["data"][0]["id"])
    except (KeyError, IndexError, TypeError):
        raise ServerError(f"{client.what} {client.url}/v1/models: no model listed") from None


class ServerSampler:
    """Answers of one prompt from one server and model name."""

    def __init__(self, client: Client, model: str, settings: GenerationSettings, stop_ids: list[int],
                 greedy: bool) -> None:
        self.client, self.model, self.settings = client, model, settings
        self.greedy = greedy or settings.temperature == 0
        self.takes_n = True  # until a server returns fewer choices than asked
        self.stop_ids = stop_ids

    def body(self, prompt: str | list[int], n: int, seed: int) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": s.max_new_tokens,
                                "temperature": 0.0 if self.greedy else s.temperature, "n": n, "seed": seed}
        if not self.greedy and s.top_p < 1.0:
            body["top_p"] = s.top_p
        # OpenAI's API has no top-k or stop ids: vLLM's and SGLang's extensions,
        # sent only where they change something (a strict server refuses unknown fields)
        if not self.greedy and s.top_k:
            body["top_k"] = s.top_k
        if self.stop_ids:
            body["stop_token_ids"] = self.stop_ids
        return body

    def answers(self, prompt: str | list[int], n: int, seed: int) -> list[tuple[str, bool]]:
        """(text, cut by max_tokens) of n answers."""
        choices = self._choices(prompt, n if self.takes_n else 1, seed)
        if len(choices) < n:
            self.takes_n = False
            for j in range(len(choices), n):
                choices += self._choices(prompt, 1, seed + j)
        return [(c["text"].strip(), c.get("finish_reason") == "length") for c in choices[:n]]

    def _choices(self, prompt: str | list[int], n: int, seed: int) -> list[dict[str, Any]]:
        answer = self.client.post("/v1/completions", self.body(prompt, n, seed))
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices or not all(
                isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
            raise ServerError(f"{self.client.what} {self.client.url}/v1/completions: the answer holds no "
                              f"choices with text ({str(answer)[:120]})")
        return sorted(choices, key=lambda c: c.get("index", 0))


def prompt_payloads(tokenizer, prompt_ids: list[list[int]]) -> list[str | list[int]]:
    """The prompt as text where the tokenizer reads it back to the same ids, else the ids."""
    out: list[str | list[int]] = []
    for ids in prompt_ids:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        same = tokenizer(text, add_special_tokens=True)["input_ids"] == ids
        out.append(text if same else ids)
    return out


def sample_from_server(sampler: ServerSampler, tokenizer, prompts: list[Prompt], data: DataSettings, *,
                       context: int | None, num_samples: int, seed: int, progress_file: str | Path | None,
                       source: str = "prompts", description: str = "sampling") -> dict[str, list[Sample]]:
    """{prompt id: N samples}; finished prompts go to progress_file as they come back."""
    settings = sampler.settings
    payloads = prompt_payloads(tokenizer, encode_prompts(tokenizer, prompts, data, settings.max_new_tokens,
                                                         context, source))
    done = {row["id"]: [Sample(**s) for s in row["samples"]]
            for row in (distributed.read_progress(progress_file) if progress_file else [])}
    todo = [i for i, p in enumerate(prompts) if p.id not in done]
    in_flight = max(1, settings.batch_size // num_samples)
    pool = concurrent.futures.ThreadPoolExecutor(in_flight)
    start, new_tokens = time.perf_counter(), 0
    with progress_bar(description, len(prompts) * num_samples, done=len(done) * num_samples) as bar:
        futures = {pool.submit(sampler.answers, payloads[i], num_samples, (seed * 1_000_003 + i) % 2**31): i
                   for i in todo}
        failed = True
        try:
            for future in concurrent.futures.as_completed(futures):
                # lengths counted here, in one thread: a tokenizer is not shared between threads
                samples = [Sample(text, count_tokens(tokenizer, text), cut) for text, cut in future.result()]
                prompt = prompts[futures[future]]
                done[prompt.id] = samples
                if progress_file:
                    distributed.append_progress(progress_file,
                                                {"id": prompt.id, "samples": [s.__dict__ for s in samples]})
                new_tokens += sum(s.n_tokens for s in samples)
                bar.advance(num_samples, tokens_per_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
            failed = False
        finally:  # on an error or an interrupt, requests in flight are not waited for
            pool.shutdown(wait=not failed, cancel_futures=True)
    return done


# --- one round: which server, which weights ------------------------------------------------------


def needs_merged_weights(config) -> bool:
    """A LoRA run whose rounds sample through a server started per round: that server loads whole
    weights, so each round's adapter is also saved merged (model/merged, read by round_model);
    a running server (generation.server.url) loads the adapter itself."""
    gen = config.generation
    return config.model.lora is not None and gen.backend == "server" and gen.server.command is not None


def round_model(config, rundir, previous: int) -> tuple[str, str | None]:
    """(model folder or hub id the server loads, LoRA adapter folder or None) for sampling from
    iteration `previous`'s model: a server command gets whole weights (a LoRA run's merged copy),
    a running server the adapter."""
    from ilrdpo.models import is_peft_folder, resolve_model_path

    if previous == 0:
        return resolve_model_path(config.model), None
    saved = rundir.file(previous, "model")
    if not is_peft_folder(str(saved)):
        return str(saved), None
    if config.generation.server.url is not None:
        return str(saved), str(saved.resolve())
    return str(saved / "merged"), None


def sample_round(config, rundir, t: int, prompts: list[Prompt], *, seed: int,
                 progress_file: Path) -> dict[str, list[Sample]]:
    """Round t's answers from iteration t-1's model through the configured server."""
    from ilrdpo.models import load_tokenizer, resolve_model_path

    gen, server = config.generation, config.generation.server
    path, adapter = round_model(config, rundir, t - 1)
    tokenizer = load_tokenizer(path, config.model)
    base = resolve_model_path(config.model)  # the architecture: context length, the model's own EOS

    def run(url: str, what: str) -> dict[str, list[Sample]]:
        client = Client(url, what=what)
        name = load_adapter(client, adapter, t - 1) if adapter else served_model(client)
        sampler = ServerSampler(client, name, gen, stop_token_ids(base, tokenizer), greedy=False)
        return sample_from_server(sampler, tokenizer, prompts, config.data, context=_context(base, config),
                                  num_samples=gen.num_samples, seed=seed, progress_file=progress_file,
                                  source=str(config.data.prompts), description=f"iter {t} sampling")

    if server.url is not None:
        return run(server.url, "generation.server.url")
    with started_server(server.command, path, rundir.file(t, "server.log")) as url:
        return run(url, "generation.server.command")


def load_adapter(client: Client, adapter: str, iteration: int) -> str:
    """vLLM's runtime LoRA loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, --enable-lora): the
    adapter folder's path must be readable by the server; an adapter already loaded is fine."""
    name = f"ilrdpo-iter{iteration}-{hashlib.sha1(adapter.encode()).hexdigest()[:8]}"
    try:
        client.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": adapter}, expect_json=False)
    except ServerError as error:
        if "already" not in str(error):
            raise
    return name


def _context(path: str, config) -> int | None:
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(model_config, "max_position_embeddings", None)

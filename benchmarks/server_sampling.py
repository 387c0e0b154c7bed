"""Sampling through an OpenAI-compatible server against the in-process sampling stage, one invocation.

    python benchmarks/server_sampling.py                          # SmolLM2-135M, transformers serve, CPU
    python benchmarks/server_sampling.py --prompts 16 --num-samples 4 --max-new-tokens 64
    python benchmarks/server_sampling.py --server-command 'vllm serve {model} --port {port}'   # on a GPU

The same prompts of the bundled training set are answered twice with greedy decoding (so both
systems produce the same answers and the same number of tokens): by
`ilrdpo.generation.generate_answers` (what `generation.backend: auto` runs: the compacting loop
on a CPU) and by `generation.backend: server`'s sampler against a server started by
`ilrdpo.serving.started_server` on the same model folder (default `transformers serve` on the
CPU). The server's start-up is printed apart and not counted. Tokens are counted alike for both:
each answer's text re-tokenised (data.count_tokens). Last line:

    server/in-process throughput=X.XXx (N prompts x S samples, M new tokens at most)

On a CPU expect the server to be slower (HTTP, one request per answer where the server ignores
`n`, no batching across requests without --continuous-batching); the point of the backend is
vLLM or SGLang on GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("ILRDPO_QUIET", "1")

SERVE = f"{Path(sys.executable).parent / 'transformers'} serve {{model}} --port {{port}} --device cpu --log-level warning"


def in_process(model_path: str, prompts, settings, data, num_samples: int) -> tuple[float, list[str]]:
    from ilrdpo.config import ModelSettings
    from ilrdpo.generation import generate_answers
    from ilrdpo.models import load_policy

    model, tokenizer, _ = load_policy(ModelSettings(name_or_path=model_path, dtype="float32"), trainable=False)
    start = time.perf_counter()
    out = generate_answers(model, tokenizer, prompts, settings, data, num_samples=num_samples, seed=0, greedy=True)
    return time.perf_counter() - start, [s.text for p in prompts for s in out[p.id]]


def through_server(command: str, model_path: str, prompts, settings, data, num_samples: int):
    from ilrdpo.config import ModelSettings
    from ilrdpo.generation.server import ServerSampler, sample_from_server, served_model, stop_token_ids
    from ilrdpo.models import load_tokenizer
    from ilrdpo.serving import Client, started_server

    tokenizer = load_tokenizer(model_path, ModelSettings())
    log = Path(tempfile.mkdtemp(prefix="ilrdpo-bench-")) / "server.log"
    start = time.perf_counter()
    with started_server(command, model_path, log) as url:
        startup = time.perf_counter() - start
        client = Client(url)
        sampler = ServerSampler(client, served_model(client), settings, stop_token_ids(model_path, tokenizer),
                                greedy=True)
        start = time.perf_counter()
        out = sample_from_server(sampler, tokenizer, prompts, data, context=None, num_samples=num_samples, seed=0,
                                 progress_file=None)
        elapsed = time.perf_counter() - start
    return startup, elapsed, [s.text for p in prompts for s in out[p.id]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="generation.batch_size for both")
    parser.add_argument("--server-command", default=SERVE)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ilrdpo.config import DataSettings, GenerationSettings, ModelSettings
    from ilrdpo.data import count_tokens
    from ilrdpo.demo import bundled_prompts
    from ilrdpo.models import load_tokenizer, resolve_model_path
    from ilrdpo.records import read_prompts

    model_path = resolve_model_path(ModelSettings(name_or_path=args.model))
    prompts = read_prompts(bundled_prompts("train"))[:args.prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  num_samples=args.num_samples)
    data = DataSettings()
    tokenizer = load_tokenizer(model_path, ModelSettings())
    local_s, local = in_process(model_path, prompts, settings, data, args.num_samples)
    startup, server_s, served = through_server(args.server_command, model_path, prompts, settings, data,
                                               args.num_samples)
    tokens = {name: sum(count_tokens(tokenizer, t) for t in texts) for name, texts in
              (("in-process", local), ("server", served))}
    same = sum(a == b for a, b in zip(local, served))
    print(f"in-process: {tokens['in-process']} tokens in {local_s:.1f} s = {tokens['in-process'] / local_s:.1f} tokens/s")
    print(f"server:     {tokens['server']} tokens in {server_s:.1f} s = {tokens['server'] / server_s:.1f} tokens/s "
          f"(start-up {startup:.1f} s not counted)")
    print(f"greedy answers equal: {same} of {len(local)}")
    ratio = (tokens["server"] / server_s) / (tokens["in-process"] / local_s)
    print(f"server/in-process throughput={ratio:.2f}x ({args.prompts} prompts x {args.num_samples} samples, "
          f"{args.max_new_tokens} new tokens at most)")


if __name__ == "__main__":
    main()

"""Generation stage throughput: ilrdpo's batched sampler against plain per-prompt generate.

    python benchmarks/generation_throughput.py                      # SmolLM2-135M, CPU
    python benchmarks/generation_throughput.py --batch-sizes 8,16,32,64 --prompts 32

For each batch size (sequences decoded together) it samples N answers for each prompt with
ilrdpo.generation.generate_answers (prompts sorted by length, N samples of a prompt in one
batch, left padding, KV cache) and prints answers/s and new tokens/s (EOS and padding not
counted). The peer is what a first script does: one `model.generate(num_return_sequences=N)`
call per prompt. Both use the same model, prompts, sampling settings and max_new_tokens, in
this one process. The last line is `ilrdpo/per-prompt tokens_per_s=X.XXx (batch B)` for the
fastest batch size.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("ILRDPO_QUIET", "1")


def per_prompt_generate(model, tokenizer, prompt_ids, settings, num_samples):
    from ilrdpo.generation import generate_hf

    answers = []
    for ids in prompt_ids:
        answers.extend(generate_hf(model, tokenizer, [ids], settings, num_samples)[0])
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8,16,32,64")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ilrdpo.config import DataSettings, GenerationSettings, ModelSettings
    from ilrdpo.demo import bundled_prompts
    from ilrdpo.generation import encode_prompts, generate_answers
    from ilrdpo.models import load_policy
    from ilrdpo.records import read_prompts

    model, tokenizer, _ = load_policy(ModelSettings(name_or_path=args.model), trainable=False)
    prompts = read_prompts(bundled_prompts("train"))[:args.prompts]
    data = DataSettings()
    device = next(model.parameters()).device
    print(f"model {args.model} on {device}, {torch.get_num_threads()} threads; {len(prompts)} prompts x "
          f"{args.num_samples} samples, max_new_tokens {args.max_new_tokens}")

    results = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch_size, top_p=0.95)
        start = time.perf_counter()
        out = generate_answers(model, tokenizer, prompts, settings, data, num_samples=args.num_samples,
                               seed=args.seed)
        elapsed = time.perf_counter() - start
        n_answers = sum(len(v) for v in out.values())
        n_tokens = sum(s.n_tokens for v in out.values() for s in v)
        results[batch_size] = n_tokens / elapsed
        print(f"ilrdpo     batch {batch_size:3d}: {n_answers / elapsed:6.2f} answers/s  "
              f"{n_tokens / elapsed:7.1f} new tokens/s  ({elapsed:.1f} s)")

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, top_p=0.95)
    prompt_ids = encode_prompts(tokenizer, prompts, data, settings.max_new_tokens, None)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    answers = per_prompt_generate(model, tokenizer, prompt_ids, settings, args.num_samples)
    elapsed = time.perf_counter() - start
    peer = sum(s.n_tokens for s in answers) / elapsed
    print(f"per-prompt generate (num_return_sequences={args.num_samples}): "
          f"{len(answers) / elapsed:6.2f} answers/s  {peer:7.1f} new tokens/s  ({elapsed:.1f} s)")
    best = max(results, key=results.get)
    print(f"ilrdpo/per-prompt tokens_per_s={results[best] / peer:.2f}x (batch {best})")


if __name__ == "__main__":
    main()

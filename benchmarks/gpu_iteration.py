"""One iteration of configs/qwen2.5-0.5b-skywork.yaml's loop on a GPU, on random weights: time and
peak GPU memory of each stage.

    python benchmarks/gpu_iteration.py --tokenizer DIR --out /tmp/gpu-iter [--prompts 64]

A GPU machine without internet has neither Qwen2.5-0.5B-Instruct nor the Skywork reward model,
so both are built here with random weights and saved as the folders a run loads: the policy
has Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 / 2 heads) on the given tokenizer's
vocabulary, the reward model a 0.6B Qwen3-sized sequence classifier's width with 8 layers.
Everything else is the config's own: bf16 compute with float32 master weights, 8 samples per
prompt, batch 256 for generation, batch 8 x grad_accum 4 for training, best-vs-worst pairs.
Random weights rarely emit EOS, so answers run to max_new_tokens (set here to 256) and
`pairing.skip_truncated` is off, or no pair would remain. Stage times and peaks are printed by
the run itself (`iter 1 train: ... s, peak GPU memory ... GiB`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

POLICY = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2}
REWARD = {"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 8}
# --tiny: both models this narrow, the same code path in seconds on a CPU (scripts/gpu_checks.sh --dry-run)
TINY = ({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},) * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=24, help="policy layers (fewer only to try the script on a CPU)")
    parser.add_argument("--tiny", action="store_true", help="width 64 for both models (to try the script on a CPU)")
    args = parser.parse_args()

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    import ilrdpo
    from ilrdpo.demo import bundled_prompts
    from ilrdpo.records import read_prompts

    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    common = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
              "max_position_embeddings": 4096, "tie_word_embeddings": True}
    torch.manual_seed(0)
    policy_shape, reward_shape = TINY if args.tiny else (POLICY, REWARD)
    policy = Qwen2ForCausalLM(Qwen2Config(**policy_shape, num_hidden_layers=args.layers, **common))
    policy.save_pretrained(out / "policy")
    reward = Qwen2ForSequenceClassification(Qwen2Config(**reward_shape, num_hidden_layers=min(8, args.layers),
                                                        num_labels=1, **common))
    reward.save_pretrained(out / "reward")
    for folder in ("policy", "reward"):
        tokenizer.save_pretrained(out / folder)
    del policy, reward

    prompts = [p.prompt for p in read_prompts(bundled_prompts("train"))[:args.prompts]]
    eval_prompts = [p.prompt for p in read_prompts(bundled_prompts("eval"))[:args.eval_prompts]]
    start = time.perf_counter()
    summaries = ilrdpo.run("configs/qwen2.5-0.5b-skywork.yaml", prompts=prompts, eval_prompts=eval_prompts, overrides={
        "model.name_or_path": str(out / "policy"), "scoring.model": str(out / "reward"),
        "generation.max_new_tokens": args.max_new_tokens, "pairing.skip_truncated": False,
        "eval.length_anchors": False, "iterations.count": 1, "output_dir": str(out / "run")})
    total = time.perf_counter() - start
    timings = json.loads((out / "run" / "timings.json").read_text())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}: {args.prompts} prompts x 8 samples x {args.max_new_tokens} new tokens, "
          f"{args.eval_prompts} eval prompts; one iteration in {total:.0f} s")
    for name, seconds in timings.items():
        print(f"  {name:<24} {seconds:7.1f} s")
    print(f"  eval length after iteration 1: {summaries[-1]['length']['tokens_mean']:.0f} tokens")


if __name__ == "__main__":
    main()

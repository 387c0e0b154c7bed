"""The demo's speed levers, each measured alone on its own stage: CPU seconds of the work a lever
removes or changes, on one thread, with the bundled SmolLM2-135M and the demo's default settings.

    python benchmarks/demo_levers.py --pairs RUN/ilrdpo/iter_1/pairs.jsonl --out /tmp/levers.json

CPU time (time.process_time) is the load-independent figure on a shared machine; wall time is
printed next to it. Measured, each on the base model:

- eval:     greedy answers to the 40 eval prompts (what one evaluation of one model costs; the
            yardstick for the others);
- anchors:  the concise and verbose length-anchor passes over the same prompts (eval.length_anchors,
            now off in the demo);
- sampling: round 1's 48 prompts x 4 samples at generation.batch_size 64 (before) and 192 (now);
- ref:      the reference log-probs of round 1's pairs (the forward pass that taking them while
            sampling would save in every round's training).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ilrdpo.demo import demo_configs
from ilrdpo.eval_stage import answer_anchors, answer_prompts
from ilrdpo.generation import generate_answers
from ilrdpo.models import load_policy
from ilrdpo.records import read_pairs, read_prompts
from ilrdpo.train import pair_reference_logps


def measured(name: str, work) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    out = {"lever": name, "cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1)}
    print(json.dumps(out), flush=True)
    return {**out, "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", help="round 1's pairs.jsonl of a default demo run (for ref)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="eval,anchors,sampling,ref")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = demo_configs(Path(args.out).parent / "levers-config")["ilrdpo"]
    model, tokenizer, _ = load_policy(config.model, trainable=False)
    eval_prompts, prompts = read_prompts(config.data.eval_prompts), read_prompts(config.data.prompts)
    gen, data = config.generation, config.data
    rows = []
    only = args.only.split(",")
    if "eval" in only:
        rows.append(measured("eval (40 prompts, greedy)", lambda: len(answer_prompts(
            model, tokenizer, eval_prompts, gen, data, greedy=True, seed=0))))
    if "anchors" in only:
        rows.append(measured("length anchors (concise + verbose)", lambda: {k: sum(r["n_tokens"] for r in v) for k, v in
                                                                           answer_anchors(model, tokenizer, eval_prompts,
                                                                                          gen, data, greedy=True,
                                                                                          seed=0).items()}))
    if "sampling" in only:
        for batch in (64, 192):
            settings = gen.model_copy(update={"batch_size": batch})
            rows.append(measured(f"round 1 sampling, batch {batch}", lambda s=settings: sum(
                x.n_tokens for v in generate_answers(model, tokenizer, prompts, s, data, num_samples=4,
                                                      seed=1000).values() for x in v)))
    if "ref" in only:
        pairs = read_pairs(Path(args.pairs))
        rows.append(measured(f"reference log-probs ({len(pairs)} pairs)", lambda: len(pair_reference_logps(
            model, tokenizer, pairs, config.loss, config.train, config.data))))
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

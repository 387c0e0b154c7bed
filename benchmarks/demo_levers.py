"""The demo's speed levers, each measured alone on its own stage: CPU seconds of the work a lever
removes or changes, on one thread, with the bundled SmolLM2-135M and the demo's default settings.

    python benchmarks/demo_levers.py --out /tmp/levers.json [--only eval,anchors,sampling,ref]

CPU time (time.process_time) is the load-independent figure on a shared machine; wall time is
printed next to it. Measured, each on the base model:

- eval:     greedy answers to the 40 eval prompts (what one evaluation of one model costs; the
            yardstick for the others);
- anchors:  the concise and verbose length-anchor passes over the same prompts (eval.length_anchors,
            now off in the demo);
- sampling: round 1's 48 prompts x 4 samples at generation.batch_size 64 (before) and 192 (now);
- ref:      the reference log-probs of pairs of round 1's answers, by the forward pass and taken
            while sampling (what every round's training saves), with their largest difference.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ilrdpo.demo import demo_configs
from ilrdpo.eval_stage import answer_anchors, answer_prompts
from ilrdpo.generation import generate_answers
from ilrdpo.models import load_policy
from ilrdpo.records import PreferencePair, read_prompts
from ilrdpo.sampled_reference import read_sample_logps, sampled_reference_logps, write_sample_logps
from ilrdpo.train import pair_reference_logps


def measured(name: str, work) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    out = {"lever": name, "cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1)}
    print(json.dumps(out), flush=True)
    return {**out, "result": result}


def printable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "result" or isinstance(v, (int, float, dict))}


def reference_rows(model, tokenizer, prompts, config) -> list[dict]:
    """Round 1's samples (batch 192, log-probs kept), paired first against second answer of each
    prompt (untruncated): the reference forward pass those pairs cost, and the same log-probs
    taken from the samples (the pairs whose ids do not re-tokenise alike still forwarded)."""
    drawn = generate_answers(model, tokenizer, prompts, config.generation, config.data, num_samples=4, seed=1000,
                             keep_logps=True)
    pairs = [PreferencePair(prompt=p.prompt, chosen=a.text, rejected=b.text)
             for p in prompts for a, b in [drawn[p.id][:2]] if not (a.truncated or b.truncated)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sample_logps.jsonl"
        write_sample_logps(path, prompts, drawn)
        sampled = read_sample_logps(path)
    forward = measured(f"reference log-probs by a forward pass ({len(pairs)} pairs)", lambda: pair_reference_logps(
        model, tokenizer, pairs, config.loss, config.train, config.data))
    taken = measured("reference log-probs taken while sampling", lambda: sampled_reference_logps(
        model, tokenizer, pairs, sampled, config.loss, config.train, config.data))
    values, forwarded = taken.pop("result")
    gap = float((values - forward.pop("result")).abs().max())
    print(json.dumps({"pairs": len(pairs), "forwarded": forwarded, "max_abs_difference": gap}), flush=True)
    return [forward, {**taken, "pairs": len(pairs), "forwarded": forwarded, "max_abs_difference": gap}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        rows += reference_rows(model, tokenizer, prompts, config)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": [printable(r) for r in rows]},
                                         indent=1))


if __name__ == "__main__":
    main()

"""One process against several: `ilrdpo train` on the same pairs, once in one plain process and
once under each engine (DDP over torchrun, FSDP2 and DeepSpeed ZeRO-2/3 through `accelerate launch`
with configs/accelerate/*.yaml), compared in one table:

- update gap: the largest weight difference between the two trained models, as a share of the
  largest weight change the one-process training made (0 = the same update);
- loss / grad norm: the largest per-step difference in metrics.jsonl (the same steps in both);
- time: wall time of each launch (start-up included; on CPU mostly start-up).

    python benchmarks/distributed_parity.py                     # tiny Llama, CPU, gloo, 2 processes
    python benchmarks/distributed_parity.py --engines ddp,zero3 --batch 1 --grad-accum 4
    python benchmarks/distributed_parity.py --model PATH --dtype bfloat16 --processes 8   # on GPUs

The tiny model (2 layers, hidden 64, SmolLM2's tokenizer, seeded) is built in a temporary folder;
the pairs are examples/pairs.jsonl. DeepSpeed rows need `pip install 'ilrdpo[deepspeed]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"ddp": None, "fsdp": "fsdp.yaml", "fsdp-zero2": "fsdp-zero2.yaml", "zero2": "deepspeed-zero2.yaml",
           "zero3": "deepspeed-zero3.yaml"}


def tiny_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_LLAMA, _smollm2_tokenizer

    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
    torch.manual_seed(1234)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def launch(engine: str | None, processes: int, args: list[str], out: Path) -> float:
    if engine is None:
        command = [sys.executable]
    elif ENGINES[engine] is None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / ENGINES[engine]), f"--num_processes={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "ILRDPO_QUIET": "1"}
    if engine and engine.startswith("zero") and not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    start = time.perf_counter()
    proc = subprocess.run([*command, "-m", "ilrdpo", "train", *args, f"output_dir={out}"], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{engine or 'one process'}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="ddp,fsdp,zero2,zero3", help=f"comma-separated, of {sorted(ENGINES)}")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--model", default=None, help="a model folder (default: a tiny seeded Llama)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8, help="pairs per micro-batch (train.batch_size)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--pairs", default=str(ROOT / "examples" / "pairs.jsonl"))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(options.model) if options.model else tiny_model(tmp / "tiny")
        args = [f"model.name_or_path={model}", f"model.dtype={options.dtype}", f"data.pairs={options.pairs}",
                f"train.batch_size={options.batch}", f"train.grad_accum={options.grad_accum}",
                "train.max_length=128", "train.learning_rate=1e-3", "train.save_steps=0"]
        seconds = launch(None, 1, args, tmp / "one")
        one, one_metrics = weights(tmp / "one" / "model"), metrics(tmp / "one")
        start = weights(model) if (model / "model.safetensors").exists() else None
        moved = max((one[k] - start[k]).abs().max().item() for k in one) if start else float("nan")
        print(f"{len(one_metrics)} optimizer steps of {options.batch} x {options.grad_accum} pairs, "
              f"{options.dtype}, {'cuda' if torch.cuda.is_available() else 'cpu'}; one process: {seconds:.0f} s, "
              f"largest weight change {moved:.3g}")
        print("| engine | processes | update gap | loss diff | grad norm diff | time (s) |")
        print("|---|---|---|---|---|---|")
        for engine in options.engines.split(","):
            out = tmp / engine
            seconds = launch(engine, options.processes, args, out)
            other, rows = weights(out / "model"), metrics(out)
            gap = max((other[k] - one[k]).abs().max().item() for k in one) / moved
            loss = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, one_metrics, strict=True))
            grad = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(rows, one_metrics, strict=True))
            print(f"| {engine} | {options.processes} | {gap:.2e} | {loss:.1e} | {grad:.1e} | {seconds:.0f} |")


if __name__ == "__main__":
    main()

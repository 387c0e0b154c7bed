"""Training throughput and peak memory: ilrdpo.train.train_round against TRL's DPOTrainer.

Both systems train the same randomly initialised model (same seed, shape and dtype) on the same
synthetic preference pairs, with the same batch (pairs per optimizer step), max_length, beta,
learning rate and optimizer (fused torch.optim.AdamW, constant rate, no warmup, clipping at 1.0).
TRL runs with precompute_ref_log_probs=True and no gradient checkpointing, as does ilrdpo
(its reference pass is always a one-off pass before training).

    python benchmarks/train_throughput.py                       # tiny Llama on CPU, < 2 min
    python benchmarks/train_throughput.py --size 135m --threads 1   # SmolLM2-135M shape on CPU
    python benchmarks/train_throughput.py --size 0.5b --device cuda --batch 8 --steps 20 --warmup 5

What is measured (identically for both systems):

* tokens/s: pair tokens of the timed steps (real prompt+answer tokens of the chosen and
  rejected rows, the prompt counted twice), divided by the wall time from the end of the last
  warmup step to the end of the last step; the same unit whether a system computes each prompt
  twice (TRL, ilrdpo with prefix sharing off) or once (ilrdpo's prefix sharing). TRL's are
  counted by a forward pre-hook on the decoder (the attention mask of its one forward a step),
  ilrdpo's come from `tokens` in metrics.jsonl; their totals are checked against the data. The
  hook also counts the positions each system computes and their padding. The reference pass
  runs before the first training step in both systems and is outside the timed window. Step
  end times come from TRL's on_step_end callback and from the per-step `elapsed_s` that
  train_round writes to metrics.jsonl. Tokens per CPU-second use the process CPU time between
  the same optimizer steps (less sensitive than wall time to other load on the machine).
* peak memory: each system runs in its own fresh subprocess of this invocation. On CUDA,
  torch.cuda.max_memory_allocated(), reset when the first training forward starts (after the
  reference pass); the model's weights are included. On CPU, the peak resident set size of the
  training phase minus the resident set size right after the model is built: the kernel's
  high-water mark (VmHWM in /proc/self/status) is reset to the current RSS by writing 5 to
  /proc/self/clear_refs when the first training forward starts, and read after training. (Where
  clear_refs cannot be written, a thread samples VmRSS every 2 ms instead.)

The last line printed is `ilrdpo/trl throughput=X.XXx peak_memory=Y.YYx`.

Tokens are words of a word-level tokenizer (token i is the word `w{i}`), so TRL's string-level
tokenisation of prompt+answer and ilrdpo's separate prompt and answer tokenisation give the
same ids; the script checks that both systems train on identical token sequences and stops if
they differ. Lengths are drawn so that no pair exceeds max_length (no truncation in either).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SIZES = {
    # Tiny Llama whose vocabulary is large next to its width, as in real LMs (head ~70% of params).
    "tiny": {"arch": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000,
             "max_position_embeddings": 2048, "plen": (8, 48), "rlen": (8, 64),
             "batch": 4, "steps": 8, "warmup": 2},
    # SmolLM2-135M shape (the demo's model): Llama, 30 layers, hidden 576, 9 heads / 3 kv heads,
    # vocab 49,152, tied head; lengths like the demo's pairs.
    "135m": {"arch": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
             "max_position_embeddings": 8192, "rope_theta": 100000.0, "plen": (32, 128), "rlen": (32, 160),
             "batch": 4, "steps": 6, "warmup": 2},
    # Qwen2.5-0.5B shape: 24 layers, hidden 896, 14 heads / 2 kv heads, vocab 151,936, tied head.
    "0.5b": {"arch": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
             "max_position_embeddings": 32768, "rope_theta": 1000000.0, "plen": (64, 256),
             "rlen": (64, 384), "batch": 8, "steps": 20, "warmup": 5},
}
PAD, EOS, BOS = 0, 1, 2
RESULT_TAG = "RESULT "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cpu for tiny; cuda (if available) for 0.5b")
    p.add_argument("--batch", type=int, default=None, help="pairs per optimizer step (default per size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default per size)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default per size)")
    p.add_argument("--max-length", type=int, default=1024, help="prompt + answer tokens per row")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in each worker "
                   "(default: torch's own choice, one per core)")
    p.add_argument("--systems", default="ilrdpo,trl", help="comma-separated, run in this order")
    p.add_argument("--prefix-sharing", choices=["auto", "on", "off"], default="auto",
                   help="ilrdpo's prefix sharing (auto: ilrdpo.batching.PREFIX_SHARING, on on CPU, off on CUDA)")
    p.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="ilrdpo's train.max_tokens_per_batch (default: micro-batches of --batch pairs)")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense bfloat16 peak for model FLOP/s utilisation on CUDA "
                   "(default: H100/H200 SXM, 989)")
    p.add_argument("--profile", action="store_true",
                   help="ilrdpo only: torch.profiler over the timed steps, the top operators by device "
                   "(CPU) time a step (benchmarks/step_profile.py); its throughput is not comparable")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    size = SIZES[a.size]
    a.batch = a.batch or size["batch"]
    a.steps = a.steps if a.steps is not None else size["steps"]
    a.warmup = a.warmup if a.warmup is not None else size["warmup"]
    if a.device is None:
        a.device = "cpu"
        if a.size != "tiny":
            import torch
            a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.steps < 1 or a.warmup < 1:
        p.error("--steps and --warmup must be at least 1 "
                "(the timed window starts at the end of a warmup step)")
    if a.max_length < 8:
        p.error("--max-length must be at least 8")
    return a


# --- data, tokenizer, model (deterministic; rebuilt identically in each worker) ---------------


def make_rows(a) -> list[dict[str, str]]:
    """batch * (warmup + steps) pairs of random words: exactly one epoch for both systems."""
    size = SIZES[a.size]
    V = size["vocab_size"]
    rng = random.Random(a.seed)
    p_lo, p_hi = size["plen"]
    r_lo, r_hi = size["rlen"]
    p_hi = max(1, min(p_hi, a.max_length // 2))
    p_lo = min(p_lo, p_hi)

    def words(n):
        return " ".join(f"w{rng.randrange(3, V)}" for _ in range(n))

    rows = []
    for _ in range(a.batch * (a.warmup + a.steps)):
        n_prompt = rng.randint(p_lo, p_hi)
        room = a.max_length - n_prompt - 1  # one EOS after each answer
        hi = max(1, min(r_hi, room))
        lo = min(r_lo, hi)
        rows.append({"prompt": words(n_prompt), "chosen": " " + words(rng.randint(lo, hi)),
                     "rejected": " " + words(rng.randint(lo, hi))})
    return rows


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer: one whitespace-separated word `w{i}` is token i; no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")


def build_model(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    not_config = ("arch", "plen", "rlen", "batch", "steps", "warmup")
    shape = {k: v for k, v in SIZES[a.size].items() if k not in not_config}
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[SIZES[a.size]["arch"]]
    config = config_cls(**shape, tie_word_embeddings=True, pad_token_id=PAD, eos_token_id=EOS,
                        bos_token_id=BOS)
    torch.manual_seed(a.seed)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    return model_cls(config).to(device=a.device, dtype=dtype)


def sequences_digest(triples) -> str:
    """sha256 over (prompt ids, chosen ids, rejected ids) of every pair, in dataset order."""
    h = hashlib.sha256()
    for prompt, chosen, rejected in triples:
        h.update(json.dumps([list(prompt), list(chosen), list(rejected)]).encode())
    return h.hexdigest()


# --- measurement shared by both workers -------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


class Meter:
    """Counts the real tokens of every training forward and tracks the training phase's peak memory.

    A forward pre-hook on the decoder (model.model: both TRL's fused head and ilrdpo's log-prob
    code run it) sees every forward; only those with gradients on are training forwards. The
    first of them starts the memory window.
    """

    def __init__(self, model, device: str):
        import torch

        self.torch, self.device = torch, device
        self.forward_tokens: list = []  # real (non-padding) positions of each training forward
        self.forward_slots: list[int] = []  # rows x width, padding included
        self.forward_step: list[int] = []  # optimizer steps taken before each training forward
        self.optimizer_steps = 0
        self.step_cpu_s: list[float] = []  # process CPU time at each optimizer step's end
        self.first_train_forward_t: float | None = None
        self._sampler: threading.Thread | None = None
        self._sampling = False
        self._sampled_peak = 0
        if device == "cuda":
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = _proc_status_bytes("VmRSS")
        self.method = None
        model.get_decoder().register_forward_pre_hook(self._hook, with_kwargs=True)
        # Both systems step a torch optimizer once per optimizer step: it attributes forwards to steps.
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(self._count_step)

    def _count_step(self, *_):
        self.optimizer_steps += 1
        self.step_cpu_s.append(time.process_time())

    def _hook(self, module, args, kwargs):
        if not self.torch.is_grad_enabled():
            return
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        if mask is None or (mask.ndim == 4 and ids is None):
            raise RuntimeError("training forward without attention_mask: cannot count its real tokens")
        if self.first_train_forward_t is None:  # the training phase starts here
            self.first_train_forward_t = time.perf_counter()
            self._start_window()
        self.forward_step.append(self.optimizer_steps)
        # a tensor: no device sync inside the timed steps. A 4D mask (ilrdpo's prefix sharing:
        # prompt + chosen + rejected in one row) says nothing about padding; the ids do (PAD is
        # never a word of the synthetic data).
        self.forward_tokens.append(mask.sum() if mask.ndim == 2 else (ids != PAD).sum())
        self.forward_slots.append(mask.shape[0] * mask.shape[-1])

    def _start_window(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.start_level = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated (reset at the first training forward)"
            return
        self.start_level = _proc_status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = ("VmHWM after training (reset via /proc/self/clear_refs at the first "
                           "training forward) - VmRSS after model load")
        except OSError:
            self.method = ("max VmRSS sampled every 2 ms from the first training forward "
                           "- VmRSS after model load")
            self._sampling, self._sampled_peak = True, self.start_level
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def _sample(self):
        while self._sampling:
            self._sampled_peak = max(self._sampled_peak, _proc_status_bytes("VmRSS"))
            time.sleep(0.002)

    def finish(self) -> dict:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            peak = self.torch.cuda.max_memory_allocated()
            return {"peak_bytes": peak, "baseline_bytes": self.baseline, "start_bytes": self.start_level,
                    "peak_increase_bytes": peak - self.baseline, "memory_method": self.method}
        if self._sampler is not None:
            self._sampling = False
            self._sampler.join()
            peak = self._sampled_peak
        else:
            peak = _proc_status_bytes("VmHWM")
        return {"peak_bytes": peak, "baseline_bytes": self.baseline, "start_bytes": self.start_level,
                "peak_increase_bytes": peak - self.baseline, "memory_method": self.method}


def summarise(a, meter: Meter, step_end_times: list[float], step_tokens: list[int], t_call: float) -> dict:
    """Timed window: from the end of warmup step `a.warmup` to the end of the last step.

    step_tokens: the pair tokens (2 x prompt + chosen + rejected) of each step, the throughput
    unit of both systems; a system that computes each prompt once computes fewer positions
    (`computed_positions`) for the same pairs."""
    n_steps = a.warmup + a.steps
    if len(step_tokens) != n_steps or len(step_end_times) != n_steps:
        raise RuntimeError(f"expected {n_steps} steps, saw {len(step_tokens)} step token counts "
                           f"and {len(step_end_times)} step ends")
    window = step_end_times[-1] - step_end_times[a.warmup - 1]
    # CPU time of the same steps (optimizer step to optimizer step): on a shared machine the wall
    # time depends on what else runs, the CPU time much less (compare at the same --threads).
    cpu_window = meter.step_cpu_s[-1] - meter.step_cpu_s[a.warmup - 1]
    tokens = sum(step_tokens[a.warmup:])
    timed = [step >= a.warmup for step in meter.forward_step]
    positions = sum(int(n) for n, on in zip(meter.forward_tokens, timed) if on)
    slots = sum(n for n, on in zip(meter.forward_slots, timed) if on)
    step_s = [t1 - t0 for t0, t1 in zip(step_end_times[a.warmup - 1:], step_end_times[a.warmup:])]
    return {
        "tokens_per_s": tokens / window,
        "tokens_per_cpu_s": tokens / cpu_window,
        "timed_tokens": tokens,
        "timed_s": window,
        "step_median_s": sorted(step_s)[len(step_s) // 2],
        "step_s": [round(s, 4) for s in step_s],
        "padding_fraction": 1 - positions / slots,
        "computed_positions": positions,
        "forwards_per_step": sum(timed) / a.steps,
        "all_tokens": sum(step_tokens),
        "setup_and_ref_s": meter.first_train_forward_t - t_call,
        **meter.finish(),
    }


# --- workers ---------------------------------------------------------------------------------


def worker_ilrdpo(a, rows) -> dict:
    from step_profile import profiled_steps  # beside this script; imports torch, as the workers do

    from ilrdpo import batching
    from ilrdpo.config import DataSettings, LossSettings, TrainSettings
    from ilrdpo.data import tokenize_pairs
    from ilrdpo.records import PreferencePair
    from ilrdpo.train import train_round

    tok = build_tokenizer(SIZES[a.size]["vocab_size"])
    pairs = [PreferencePair(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in rows]
    loss = LossSettings(type="sigmoid", beta=a.beta, alpha=0.0)
    train = TrainSettings(learning_rate=a.lr, epochs=1.0, batch_size=a.batch, grad_accum=1,
                          max_length=a.max_length, warmup_ratio=0.0, lr_scheduler="constant",
                          weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,
                          max_tokens_per_batch=a.max_tokens_per_batch)
    if a.prefix_sharing != "auto":  # the layout to measure, on this device
        batching.PREFIX_SHARING[a.device] = a.prefix_sharing == "on"
    data = DataSettings(use_chat_template=False)
    # The same call train_round makes, for the identity check only (not timed, before the model).
    examples = tokenize_pairs(tok, pairs, max_length=train.max_length,
                              use_chat_template=data.use_chat_template, system_prompt=data.system_prompt)
    digest = sequences_digest((e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in examples)
    truncated = sum(e.truncated for e in examples)
    del examples

    model = build_model(a)
    meter = Meter(model, a.device)
    out = Path(a.workdir) / "ilrdpo_out"
    t_call = time.perf_counter()
    with profiled_steps(a.warmup, a.steps, a.device) if a.profile else contextlib.nullcontext([]) as profile_lines:
        train_round(model, tok, pairs, loss=loss, train=train, data=data, output_dir=out, seed=a.seed)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # train_round's own count of each step's pairs' tokens (2*prompt + chosen + rejected); the
    # driver checks their total against the data, and the hook's positions against it below.
    cumulative = [0] + [r["tokens"] for r in records]
    step_tokens = [b - c for c, b in itertools.pairwise(cumulative)]
    result = summarise(a, meter, [r["elapsed_s"] for r in records], step_tokens, t_call)
    computed = sum(int(n) for n in meter.forward_tokens)
    if a.prefix_sharing == "off" and computed != result["all_tokens"]:
        raise RuntimeError(f"token counts differ: metrics.jsonl {result['all_tokens']}, hook {computed}")
    result.update(digest=digest, truncated=truncated, n_params=sum(p.numel() for p in model.parameters()),
                  guard_s=guard_seconds(model, a.device), profile=profile_lines)
    return result


def guard_seconds(model, device: str) -> float:
    """Median time of the divergence guard's check after an optimizer step (DivergenceGuard.check
    on this model's trainable weights: its norm, a pass over every weight and a host sync, and
    the rules' arithmetic), timed apart from the steps, which run it too."""
    import torch

    from ilrdpo.guard import DivergenceGuard

    guard = DivergenceGuard([p for p in model.parameters() if p.requires_grad])
    times = []
    for step in range(1, 8):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        guard.check(step, loss=0.69, grad_norm=1.0, loss_at_reference=0.69)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def worker_trl(a, rows) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = build_tokenizer(SIZES[a.size]["vocab_size"])
    model = build_model(a)
    meter = Meter(model, a.device)
    step_end_times: list[float] = []
    cuda = a.device == "cuda"

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_end_times.append(time.perf_counter())

    config = DPOConfig(
        output_dir=str(Path(a.workdir) / "trl_out"), per_device_train_batch_size=a.batch,
        max_steps=a.warmup + a.steps, num_train_epochs=1, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", beta=a.beta,
        loss_type=["sigmoid"], max_length=a.max_length, precompute_ref_log_probs=True,
        gradient_checkpointing=False, use_cpu=not cuda, bf16=cuda, logging_strategy="no",
        report_to="none", save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=a.seed,
    )
    t_call = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    ds = trainer.train_dataset
    digest = sequences_digest(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    trainer.add_callback(StepClock())
    trainer.train()
    # one forward per step (TRL concatenates chosen and rejected rows): its real tokens
    result = summarise(a, meter, step_end_times, [int(n) for n in meter.forward_tokens], t_call)
    result.update(digest=digest, truncated=0, n_params=sum(p.numel() for p in model.parameters()))
    return result


# --- driver ----------------------------------------------------------------------------------


def run_worker(a):
    import warnings

    warnings.filterwarnings("ignore")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    rows = json.loads((Path(a.workdir) / "rows.json").read_text())
    result = {"ilrdpo": worker_ilrdpo, "trl": worker_trl}[a.worker](a, rows)
    print(RESULT_TAG + json.dumps(result), flush=True)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "ilrdpo"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return run_worker(a)
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    rows = make_rows(a)
    size = SIZES[a.size]
    real = sum(2 * len(r["prompt"].split()) + len(r["chosen"].split()) + len(r["rejected"].split()) + 2
               for r in rows)
    print(f"train_throughput: size={a.size} device={a.device} batch={a.batch} steps={a.steps} "
          f"warmup={a.warmup} max_length={a.max_length} beta={a.beta} lr={a.lr} seed={a.seed} "
          f"ilrdpo: prefix_sharing={a.prefix_sharing} max_tokens_per_batch={a.max_tokens_per_batch} "
          f"pairs={len(rows)} ({real} real tokens, {real / len(rows) / 2:.0f} per row on average)")
    print("versions: " + " ".join(f"{k}={v}" for k, v in versions().items())
          + f" cpus={os.cpu_count()} threads={a.threads or 'default'}")
    print(f"model: {size['arch']} layers={size['num_hidden_layers']} hidden={size['hidden_size']} "
          f"vocab={size['vocab_size']} dtype={'bfloat16' if a.device == 'cuda' else 'float32'}")

    results = {}
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as workdir:
        (Path(workdir) / "rows.json").write_text(json.dumps(rows))
        env = dict(os.environ, ILRDPO_QUIET="1", TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
                   TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   HF_DATASETS_CACHE=str(Path(workdir) / "hf_datasets"), TOKENIZERS_PARALLELISM="false",
                   PYTHONWARNINGS="ignore")
        base = [sys.executable, os.path.abspath(__file__), "--size", a.size, "--device", a.device,
                "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
                "--max-length", str(a.max_length), "--beta", str(a.beta), "--lr", str(a.lr),
                "--seed", str(a.seed), "--workdir", workdir]
        if a.threads:
            base += ["--threads", str(a.threads)]
        base += ["--prefix-sharing", a.prefix_sharing]
        if a.max_tokens_per_batch:
            base += ["--max-tokens-per-batch", str(a.max_tokens_per_batch)]
        if a.profile:
            if systems != ["ilrdpo"]:
                raise SystemExit("--profile profiles ilrdpo alone: add --systems ilrdpo")
            base += ["--profile"]
        for name in systems:
            t0 = time.perf_counter()
            proc = subprocess.run(base + ["--worker", name], env=env, capture_output=True, text=True,
                                  check=False)
            lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"{name} worker failed (exit status {proc.returncode})")
            results[name] = r = json.loads(lines[-1][len(RESULT_TAG):])
            r["process_s"] = time.perf_counter() - t0
            mib = 1024 ** 2
            mem = (f"peak_memory={r['peak_bytes'] / 1e9:.2f} GB "
                   f"(model load {r['baseline_bytes'] / 1e9:.2f} GB)"
                   if a.device == "cuda" else
                   f"peak_rss_increase={r['peak_increase_bytes'] / mib:.0f} MiB "
                   f"(rss after model load {r['baseline_bytes'] / mib:.0f} MiB, "
                   f"at first training step {r['start_bytes'] / mib:.0f} MiB)")
            # model FLOP/s: 6 x parameters per pair token (forward + backward), the usual convention
            flops = 6 * r["n_params"] * r["tokens_per_s"]
            mfu = f", MFU {100 * flops / (a.peak_tflops * 1e12):.1f}%" if a.device == "cuda" else ""
            print(f"{name:>6}: tokens/s={r['tokens_per_s']:,.0f} ({r['timed_tokens']} tokens in "
                  f"{r['timed_s']:.2f} s over {a.steps} steps, median step {r['step_median_s']:.3f} s, "
                  f"padding {100 * r['padding_fraction']:.1f}%, {r['computed_positions']} positions computed "
                  f"in {r['forwards_per_step']:.1f} forwards a step) {mem}; setup+reference pass "
                  f"{r['setup_and_ref_s']:.1f} s, process {r['process_s']:.1f} s")
            print(f"{'':>6}  model {flops / 1e12:.3f} TFLOP/s (6 x {r['n_params'] / 1e6:.0f}M parameters x "
                  f"tokens/s){mfu}")
            if "guard_s" in r:
                print(f"{'':>6}  divergence guard {1e3 * r['guard_s']:.2f} ms a step "
                      f"({100 * r['guard_s'] / r['step_median_s']:.1f}% of the median step)")
            for line in r.get("profile", []):
                print(f"{'':>6}  {line}")
    print(f"memory method: {next(iter(results.values()))['memory_method']}")
    if len({r["digest"] for r in results.values()}) > 1:
        raise SystemExit("the systems did not train on identical token sequences: "
                         + ", ".join(f"{k}={v['digest'][:12]}" for k, v in results.items()))
    for name, r in results.items():
        if r["all_tokens"] != real:  # one epoch: every pair's tokens exactly once
            raise SystemExit(f"{name} trained on {r['all_tokens']} real tokens, expected {real}")
    print(f"token sequences identical in both systems: sha256 {next(iter(results.values()))['digest'][:16]}, "
          f"truncated pairs: {sum(r['truncated'] for r in results.values())}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    if "ilrdpo" in results and "trl" in results:
        i, t = results["ilrdpo"], results["trl"]
        print(f"ilrdpo/trl tokens per CPU-second={i['tokens_per_cpu_s'] / t['tokens_per_cpu_s']:.2f}x "
              f"(ilrdpo {i['tokens_per_cpu_s']:.1f}, trl {t['tokens_per_cpu_s']:.1f}; process CPU time "
              f"of the timed steps, less sensitive than wall time to other load)")
        mem_key = "peak_bytes" if a.device == "cuda" else "peak_increase_bytes"
        print(f"ilrdpo/trl throughput={i['tokens_per_s'] / t['tokens_per_s']:.2f}x "
              f"peak_memory={i[mem_key] / t[mem_key]:.2f}x")


if __name__ == "__main__":
    main()

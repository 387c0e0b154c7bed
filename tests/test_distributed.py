"""Several processes (torchrun, gloo on CPU; `accelerate launch --multi_gpu` on GPUs) give what
one process gives: the same samples, pairs and evaluation answers, and trained weights equal up to
float summation order; a killed multi-process run resumes, with any number of processes, to the
single-process result."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SCORER, shared_folder
from ilrdpo import distributed

PAIRS_FILE = Path(__file__).resolve().parents[1] / "examples" / "pairs.jsonl"
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what `accelerate launch` sets from fsdp.yaml
DEEPSPEED_ENV = {"DS_ACCELERATOR": "cpu"} if not torch.cuda.is_available() else {}  # DeepSpeed's CPU backend


def launch(args: list[str], cwd: Path, processes: int = 1, fault: str | None = None,
           env_extra: dict[str, str] | None = None, accelerate_config: str | None = None) -> subprocess.CompletedProcess:
    command = TORCHRUN + [f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    if accelerate_config:  # the real launcher with a config of configs/accelerate/
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ACCELERATE_CONFIGS / accelerate_config), f"--num_processes={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("ILRDPO_FAULT", None)
    if fault:
        env["ILRDPO_FAULT"] = fault
    return subprocess.run(command + ["-m", "ilrdpo", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def train_one_process(tmp_path_factory, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`ilrdpo train ARGS` in one plain process, into tmp_path/one: run once per test session for
    the same arguments (several engines are compared with the same one-process run) and copied."""
    key = hashlib.sha256("\0".join(args).encode()).hexdigest()[:16]

    def build(folder: Path) -> None:
        proc = launch(["train", *args, f"output_dir={folder / 'one'}"], folder)
        assert proc.returncode == 0, proc.stderr[-3000:]

    shutil.copytree(shared_folder(tmp_path_factory, f"one_process_{key}", build) / "one", tmp_path / "one")
    return subprocess.CompletedProcess(args, 0, "", "")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def largest_gap(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# Adam divides by small second moments, so float summation order (how a batch is split over processes,
# the CPU's kernels) shows in the weights: measured from 0.3% to 1.06% of the largest weight move on
# different 2-core machines. A wrong average or a lost micro-batch moves them by tens of percent.
SUMMATION_NOISE = 3e-2


# --- the helpers in one process ------------------------------------------------------------------


def test_one_process_is_the_whole_world(tmp_path):
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.mine(3) == [0, 1, 2]
    assert distributed.rank_file(tmp_path / "x.jsonl") == tmp_path / "x.jsonl"
    assert distributed.gather_dict({"a": 1}) == {"a": 1} and distributed.broadcast(7) == 7
    (tmp_path / "x.jsonl.rank1").write_text("")
    assert distributed.rank_files(tmp_path / "x.jsonl") == [tmp_path / "x.jsonl", tmp_path / "x.jsonl.rank1"]


# --- `ilrdpo train`: several processes against one -------------------------------------------------
# Every multi-process launch costs seconds of interpreter, torch and process-group start-up, so each
# configuration is launched once and checked for everything it shows, and the one-process results it
# is compared with are computed once per test session (shared by the xdist workers).

TRAIN = ("model.dtype=float32", f"data.pairs={PAIRS_FILE}", "train.max_length=128", "train.learning_rate=1e-3")
# The 16 pairs in micro-batches of 3 (split 2 + 1 over two processes: weighted by pairs, not by
# process), 2 micro-batches a step: steps of 6, 6 and 4 pairs, the last micro-batch one pair (the
# second process has none: a zero-weighted pass in lockstep for the sharded engines, no pass for
# replicas), gradients clipped at 0.5 (active: the first steps' norms are larger).
UNEVEN = ("train.batch_size=3", "train.grad_accum=2", "train.max_grad_norm=0.5")
LORA = ("model.lora.r=4", "model.lora.lora_dropout=0")


def train_both(tiny_model_dir: Path, tmp_path: Path, tmp_path_factory, extra: tuple[str, ...], processes: int = 2,
               accelerate_config: str | None = None, env_extra: dict[str, str] | None = None) -> tuple[Path, Path]:
    """`ilrdpo train` with the same arguments in one plain process (once per session, copied to
    tmp_path/one) and launched as asked (tmp_path/two); both folders."""
    args = [f"model.name_or_path={tiny_model_dir}", *TRAIN, *extra]
    train_one_process(tmp_path_factory, args, tmp_path)
    two = launch(["train", *args, f"output_dir={tmp_path / 'two'}"], tmp_path, processes=processes,
                 accelerate_config=accelerate_config, env_extra=env_extra)
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp_path / "one", tmp_path / "two"


def metric_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


ENGINES = [  # (launcher: accelerate config or plain torchrun, environment, processes)
    (None, None, 2), ("fsdp.yaml", None, 2), ("fsdp-zero2.yaml", None, 2),
    ("deepspeed-zero2.yaml", DEEPSPEED_ENV, 2), ("deepspeed-zero3.yaml", DEEPSPEED_ENV, 2),
    ("deepspeed-zero3.yaml", DEEPSPEED_ENV, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("config,env,processes", ENGINES, ids=[
    "DDP", "FSDP full shard", "FSDP ZeRO-2-like", "ZeRO-2", "ZeRO-3", "ZeRO-3 in one process"])
def test_engines_train_what_one_plain_process_trains(tiny_model_dir, tmp_path, tmp_path_factory, config, env,
                                                     processes):
    """Replicas (DDP over torchrun), FSDP2's shards (weights, gradients and optimizer state; full
    shard, and kept gathered from forward to backward) and DeepSpeed ZeRO-2/3 partitions (also with
    the engine in one process) give the plain one-process update, its losses, gradient norms and
    learning rates, with ilrdpo's weighting of uneven shares, lockstep passes, unmanaged
    accumulation and clipping."""
    if config and config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'ilrdpo[deepspeed]')")
    one, two = train_both(tiny_model_dir, tmp_path, tmp_path_factory, UNEVEN, processes, config, env)
    moved = largest_gap(one / "model", tiny_model_dir)
    assert largest_gap(two / "model", one / "model") < SUMMATION_NOISE * moved
    assert set(weights(two / "model")) == set(weights(one / "model"))
    rows = [metric_rows(one), metric_rows(two)]
    assert len(rows[0]) == len(rows[1]) == 3
    assert rows[0][0]["grad_norm"] > 0.5  # clipping is active
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [r[key] for r in rows[1]] == pytest.approx([r[key] for r in rows[0]], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("engine,extra,tolerance", [
    ("ddp", LORA, 1e-2),
    ("fsdp", LORA, 1e-2),
    # sharded: weights gathered in bfloat16 (FSDP's mixed precision) where one process autocasts
    ("fsdp", ("model.dtype=bfloat16",), 0.1),
    ("deepspeed-zero2.yaml", LORA, 1e-2),
    # DeepSpeed's bf16 mode: bfloat16 weights, activations and gradients, float32 master weights
    ("deepspeed-zero3.yaml", ("model.dtype=bfloat16",), 0.1),
], ids=["LoRA DDP", "LoRA FSDP", "bfloat16 FSDP", "LoRA ZeRO-2", "bfloat16 ZeRO-3"])
def test_lora_and_bfloat16_train_under_several_processes_as_in_one(tiny_model_dir, tmp_path, tmp_path_factory,
                                                                     engine, extra, tolerance):
    """LoRA (the reference is the adapter switched off: no second model) and bfloat16 mixed
    precision with float32 master weights, split over two processes."""
    if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'ilrdpo[deepspeed]')")
    one, two = train_both(tiny_model_dir, tmp_path, tmp_path_factory, ("train.batch_size=8", *extra),
                          env_extra={"fsdp": FSDP, "ddp": None}.get(engine, DEEPSPEED_ENV),
                          accelerate_config=engine if engine.endswith(".yaml") else None)
    name = "adapter_model.safetensors" if extra == LORA else "model.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(one / "model" / name), load_file(two / "model" / name)
    assert set(a) == set(b)
    start = weights(tiny_model_dir) if name == "model.safetensors" else \
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in a.items()}  # LoRA B starts at zero

    def norm(x: dict) -> float:
        return float(torch.cat([v.float().flatten() for v in x.values()]).norm())

    moved = norm({k: a[k].float() - start[k].float() for k in a})
    # Adam's first steps move each weight by about the learning rate whatever its gradient, so
    # round-off flips single near-zero gradients: the whole update is compared, not one weight
    assert moved > 0 and norm({k: a[k].float() - b[k].float() for k in a}) < tolerance * moved


# --- `ilrdpo run`: several processes against one, killed and resumed --------------------------------

PROMPTS = ["What is the capital of France?", "Name a color.", "What is water?", "Say hello.",
           "What is 2 + 2?", "Which animal says moo?", "Why is the sky blue?", "Name a fruit."]


def _write_run(folder: Path, tiny_model_dir: Path) -> None:
    (folder / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "id": f"t{i}"}) + "\n"
                                            for i, p in enumerate(PROMPTS)))
    (folder / "e.jsonl").write_text('{"prompt": "What is ice?", "id": "e0"}\n{"prompt": "Name a planet.", "id": "e1"}\n')
    # 2 rows per generation batch (4 batches of 2 prompts x 2 samples... dealt to 2 processes),
    # 2 pairs per micro-batch: each process computes one pair of every micro-batch
    (folder / "run.yaml").write_text(f"""model: {{name_or_path: {tiny_model_dir}, dtype: float32}}
data: {{prompts: {folder / 'p.jsonl'}, eval_prompts: {folder / 'e.jsonl'}}}
generation: {{num_samples: 2, max_new_tokens: 8, temperature: 1.0, batch_size: 2}}
scoring: {{type: python, function: "{SCORER}:char_count", batch_size: 2}}
pairing: {{skip_truncated: false}}
train: {{batch_size: 2, learning_rate: 1.0e-3, epochs: 2, warmup_ratio: 0.0, max_length: 128}}
iterations: {{count: 2}}
seed: 0
""")
    proc = launch(["run", str(folder / "run.yaml"), f"output_dir={folder / 'one'}"], folder)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def run_config(tmp_path_factory, tiny_model_dir) -> Path:
    """A two-iteration run's config; its one-process run is in the folder's one/ (both built once
    per test session, shared by the xdist workers; read-only)."""
    return shared_folder(tmp_path_factory, "dist_run", lambda folder: _write_run(folder, tiny_model_dir)) / "run.yaml"


@pytest.fixture(scope="session")
def one_process_run(run_config) -> Path:
    return run_config.parent / "one"


def same_run(actual: Path, expected: Path) -> None:
    for t in (1, 2):
        for name in ("candidates.jsonl", "pairs.jsonl", "eval_answers.jsonl"):
            assert (actual / f"iter_{t}" / name).read_text() == (expected / f"iter_{t}" / name).read_text(), name
    moved = largest_gap(expected / "iter_2" / "model", expected / "iter_1" / "model")
    assert largest_gap(actual / "iter_2" / "model", expected / "iter_2" / "model") < SUMMATION_NOISE * moved
    assert not [p for p in actual.rglob("*.rank*")]  # progress files of the processes are gone


def first_round_steps(one_process_run: Path) -> int:
    return len((one_process_run / "iter_1" / "metrics.jsonl").read_text().splitlines())


def finished(out: Path) -> dict[str, list[str]]:
    return json.loads((out / "state.json").read_text())["finished"]


# Each test below kills one run more than once, each time under another launcher, and resumes it to
# the uninterrupted single-process result: a kill and the next launch's resume are one property each.


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_single_process_result(run_config, one_process_run, tmp_path):
    """Two processes sample, score and pair iteration 1 and are killed in its training (the main
    process writes the metrics); two processes resume it, say it once, and the second process dies
    after its first sampled batch of iteration 2; one process finishes the run, reusing that
    process's progress file: what one process gives."""
    out = tmp_path / "killed"
    args = ["run", str(run_config), f"output_dir={out}"]
    crashed = launch(args, tmp_path, processes=2, fault="metrics.partial.jsonl:3")
    assert crashed.returncode != 0
    assert "pair" in finished(out)["1"] and "train" not in finished(out)["1"], crashed.stderr[-3000:]
    crashed = launch(args, tmp_path, processes=2, fault="generation.partial.jsonl.rank1:1")
    assert crashed.returncode != 0
    assert "eval" in finished(out)["1"] and "generate" not in finished(out).get("2", []), crashed.stderr[-3000:]
    assert (out / "iter_2" / "generation.partial.jsonl.rank1").is_file()
    said = [line.split(":")[0].split("  ")[0] for line in crashed.stderr.splitlines() if line.startswith("iter 1 ")]
    assert sorted(said) == ["iter 1", "iter 1 eval", "iter 1 train"], said  # one voice: each line once
    resumed = launch(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_run(out, one_process_run)


@pytest.mark.slow
def test_killed_fsdp_run_resumes_in_one_process_from_its_checkpoint(run_config, one_process_run, tmp_path):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` (full shard, activation
    checkpointing) runs iteration 1 whole and samples iteration 2 as one process does, and is killed
    in iteration 2's training: its checkpoint holds gathered weights and optimizer state, and one
    unsharded process takes it up to the single-process result."""
    out = tmp_path / "fsdp-killed"
    args = ["run", str(run_config), f"output_dir={out}", "train.save_steps=1"]
    crashed = launch(args, tmp_path, processes=2, accelerate_config="fsdp.yaml",
                     fault=f"metrics.partial.jsonl:{first_round_steps(one_process_run) + 3}")
    assert crashed.returncode != 0
    assert "eval" in finished(out)["1"] and "train" not in finished(out)["2"], crashed.stderr[-3000:]
    assert (out / "iter_2" / "checkpoint" / "state.pt").is_file()
    resumed = launch(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training from the checkpoint at step 2" in resumed.stderr + resumed.stdout
    same_run(out, one_process_run)


# --- DeepSpeed ZeRO (over gloo on CPU: DeepSpeed's CPU accelerator) --------------------------------

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install 'ilrdpo[deepspeed]')")


@pytest.mark.slow
@needs_deepspeed
def test_a_killed_deepspeed_round_resumes_across_engines(run_config, one_process_run, tmp_path):
    """Checkpoints hold whole weights and AdamW moments: a round killed under ZeRO-2 (iteration 1)
    resumes in one process, and that process's checkpoint, killed in iteration 2, resumes under
    ZeRO-3 (weights partitioned for training, the saved model gathered whole for evaluation), to
    the uninterrupted result."""
    out = tmp_path / "resumed"
    args = ["run", str(run_config), f"output_dir={out}", "train.save_steps=1"]

    def go(config, fault=None):
        return launch(args, tmp_path, processes=2 if config else 1, fault=fault, accelerate_config=config,
                      env_extra=DEEPSPEED_ENV)

    crashed = go("deepspeed-zero2.yaml", fault="metrics.partial.jsonl:3")
    assert crashed.returncode != 0
    assert (out / "iter_1" / "checkpoint" / "state.pt").is_file(), crashed.stderr[-3000:]
    # resumed: the metrics file rewritten up to step 2 (one write), the round's other lines, then 3 of iteration 2
    crashed = go(None, fault=f"metrics.partial.jsonl:{1 + first_round_steps(one_process_run) - 2 + 3}")
    assert crashed.returncode != 0
    assert "resuming training from the checkpoint at step 2" in crashed.stderr + crashed.stdout
    assert "eval" in finished(out)["1"] and "train" not in finished(out)["2"], crashed.stderr[-3000:]
    assert (out / "iter_2" / "checkpoint" / "state.pt").is_file()
    resumed = go("deepspeed-zero3.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training from the checkpoint at step 2" in resumed.stderr + resumed.stdout
    same_run(out, one_process_run)


@pytest.mark.parametrize("env,says", [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, "zero_stage 0"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "train.grad_accum"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_GRADIENT_CLIPPING": "0.3"}, "train.max_grad_norm"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, "zero_stage 3"),
], ids=["stage 0", "accumulation", "clipping", "param offload at stage 2"])
def test_deepspeed_settings_ilrdpo_cannot_honour_are_refused(monkeypatch, env, says):
    from ilrdpo import zero
    from ilrdpo.errors import UserInputError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserInputError, match=says):
        zero.engine_config(1.0, torch.float32)


def test_a_deepspeed_config_file_gives_zero_settings_but_not_the_optimizer(monkeypatch, tmp_path):
    from ilrdpo import zero
    from ilrdpo.errors import UserInputError

    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1000},
                                "train_batch_size": "auto"}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(file))
    config = zero.engine_config(1.0, torch.bfloat16)
    assert config["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 1000}
    assert config["bf16"] == {"enabled": True} and "train_batch_size" not in config
    assert config["managed_gradient_accumulation"] is False and config["gradient_clipping"] == 1.0
    file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(UserInputError, match=f"{file}: key 'optimizer'"):
        zero.engine_config(1.0, torch.float32)
    file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}))
    with pytest.raises(UserInputError, match="fp16 is not supported"):
        zero.engine_config(1.0, torch.float32)
    file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": False}, "bf16": {"enabled": True}}))
    assert zero.engine_config(1.0, torch.bfloat16)["bf16"] == {"enabled": True}
    with pytest.raises(UserInputError, match="model.dtype: bfloat16"):
        zero.engine_config(1.0, torch.float32)
    file.write_text("{not json")
    with pytest.raises(UserInputError, match=f"{file}: not a readable DeepSpeed JSON config"):
        zero.engine_config(1.0, torch.float32)


@pytest.mark.parametrize("env,says", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version 1"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, "zero_stage 0"),
], ids=["FSDP1", "ZeRO stage 0"])
def test_an_unsupported_engine_is_refused_in_one_line(monkeypatch, capsys, env, says):
    """An FSDP1 config of accelerate would silently run as full replicas, ZeRO stage 0 is plain
    data parallelism (multi-gpu.yaml): refused before anything runs (without DeepSpeed installed,
    the refusal says so instead)."""
    from ilrdpo import cli

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "ACCELERATE_USE_DEEPSPEED" in env and importlib.util.find_spec("deepspeed") is None:
        says = "DeepSpeed is not installed"
    monkeypatch.setattr(sys, "argv", ["ilrdpo", "train"])  # before the config is read
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: accelerate config:") and says in err and len(err.splitlines()) == 1

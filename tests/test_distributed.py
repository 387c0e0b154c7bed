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


# --- the helpers in one process ------------------------------------------------------------------


def test_one_process_is_the_whole_world(tmp_path):
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.mine(3) == [0, 1, 2]
    assert distributed.rank_file(tmp_path / "x.jsonl") == tmp_path / "x.jsonl"
    assert distributed.gather_dict({"a": 1}) == {"a": 1} and distributed.broadcast(7) == 7
    (tmp_path / "x.jsonl.rank1").write_text("")
    assert distributed.rank_files(tmp_path / "x.jsonl") == [tmp_path / "x.jsonl", tmp_path / "x.jsonl.rank1"]


# --- two processes against one ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    prompts = ["What is the capital of France?", "Name a color.", "What is water?", "Say hello.",
               "What is 2 + 2?", "Which animal says moo?", "Why is the sky blue?", "Name a fruit."]
    (folder / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "id": f"t{i}"}) + "\n"
                                            for i, p in enumerate(prompts)))
    (folder / "e.jsonl").write_text('{"prompt": "What is ice?", "id": "e0"}\n{"prompt": "Name a planet.", "id": "e1"}\n')
    config = folder / "run.yaml"
    # 2 rows per generation batch (4 batches of 2 prompts x 2 samples... dealt to 2 processes),
    # 2 pairs per micro-batch: each process computes one pair of every micro-batch
    config.write_text(f"""model: {{name_or_path: {tiny_model_dir}, dtype: float32}}
data: {{prompts: {folder / 'p.jsonl'}, eval_prompts: {folder / 'e.jsonl'}}}
generation: {{num_samples: 2, max_new_tokens: 8, temperature: 1.0, batch_size: 2}}
scoring: {{type: python, function: "{SCORER}:char_count", batch_size: 2}}
pairing: {{skip_truncated: false}}
train: {{batch_size: 2, learning_rate: 1.0e-3, epochs: 2, warmup_ratio: 0.0, max_length: 128}}
iterations: {{count: 2}}
seed: 0
""")
    return config


@pytest.fixture(scope="module")
def one_process_run(run_config) -> Path:
    out = run_config.parent / "one"
    proc = launch(["run", str(run_config), f"output_dir={out}"], run_config.parent)
    assert proc.returncode == 0, proc.stderr
    return out


# Adam divides by small second moments, so float summation order (how a batch is split over processes,
# the CPU's kernels) shows in the weights: measured from 0.3% to 1.06% of the largest weight move on
# different 2-core machines. A wrong average or a lost micro-batch moves them by tens of percent.
SUMMATION_NOISE = 3e-2


def same_run(actual: Path, expected: Path) -> None:
    for t in (1, 2):
        for name in ("candidates.jsonl", "pairs.jsonl", "eval_answers.jsonl"):
            assert (actual / f"iter_{t}" / name).read_text() == (expected / f"iter_{t}" / name).read_text(), name
    moved = largest_gap(expected / "iter_2" / "model", expected / "iter_1" / "model")
    assert largest_gap(actual / "iter_2" / "model", expected / "iter_2" / "model") < SUMMATION_NOISE * moved
    assert not [p for p in actual.rglob("*.rank*")]  # progress files of the processes are gone


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tiny_model_dir, tmp_path, tmp_path_factory):
    """`ilrdpo train` with the global batch of the config (8 pairs a step), split 4 + 4."""
    args = [f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", f"data.pairs={PAIRS_FILE}",
            "train.batch_size=8", "train.max_length=128", "train.learning_rate=1e-3"]
    one = train_one_process(tmp_path_factory, args, tmp_path)
    two = launch(["train", *args, f"output_dir={tmp_path / 'two'}"], tmp_path, processes=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    moved = largest_gap(tmp_path / "one" / "model", tiny_model_dir)
    assert largest_gap(tmp_path / "two" / "model", tmp_path / "one" / "model") < SUMMATION_NOISE * moved
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 2 and losses[1] == pytest.approx(losses[0], abs=1e-5)


@pytest.mark.slow
def test_two_process_run_samples_pairs_and_trains_like_one(run_config, one_process_run):
    out = run_config.parent / "two"
    proc = launch(["run", str(run_config), f"output_dir={out}"], run_config.parent, processes=2)
    assert proc.returncode == 0, proc.stderr
    same_run(out, one_process_run)
    assert proc.stderr.count("final model:") == 1  # one voice


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_single_process_result(run_config, one_process_run):
    out = run_config.parent / "killed"
    # killed in training (the main process writes the metrics) ...
    crashed = launch(["run", str(run_config), f"output_dir={out}"], run_config.parent, processes=2,
                     fault="metrics.partial.jsonl:3")
    assert crashed.returncode != 0
    state = json.loads((out / "state.json").read_text())
    assert "train" not in state["finished"]["1"]
    assert launch(["run", str(run_config), f"output_dir={out}"], run_config.parent, processes=2).returncode == 0
    same_run(out, one_process_run)


@pytest.mark.slow
def test_killed_in_sampling_resumes_with_another_number_of_processes(run_config, one_process_run):
    """The second process dies after its first sampled batch; one process finishes the run,
    reusing that process's progress file."""
    out = run_config.parent / "sampling"
    crashed = launch(["run", str(run_config), f"output_dir={out}"], run_config.parent, processes=2,
                     fault="generation.partial.jsonl.rank1:1")
    assert crashed.returncode != 0
    assert (out / "iter_1" / "generation.partial.jsonl.rank1").is_file()
    assert launch(["run", str(run_config), f"output_dir={out}"], run_config.parent).returncode == 0
    same_run(out, one_process_run)


# --- FSDP (fully_shard over gloo on CPU) --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("batch,config", [((8, 1), "fsdp.yaml"), ((1, 4), "fsdp.yaml"), ((8, 1), "fsdp-zero2.yaml")],
                         ids=["4+4 pairs", "1 pair per micro-batch", "ZeRO-2-like"])
def test_fsdp_two_processes_train_what_one_process_trains(tiny_model_dir, tmp_path, tmp_path_factory, batch,
                                                          config):
    """Sharded weights, gradients and optimizer state give the single-process update; with one pair
    per micro-batch the second process runs a zero-weighted pass in lockstep."""
    batch_size, grad_accum = batch
    args = [f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", f"data.pairs={PAIRS_FILE}",
            f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}", "train.max_length=128",
            "train.learning_rate=1e-3"]
    one = train_one_process(tmp_path_factory, args, tmp_path)
    two = launch(["train", *args, f"output_dir={tmp_path / 'two'}"], tmp_path, processes=2,
                 accelerate_config=config)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    moved = largest_gap(tmp_path / "one" / "model", tiny_model_dir)
    assert largest_gap(tmp_path / "two" / "model", tmp_path / "one" / "model") < SUMMATION_NOISE * moved
    assert set(weights(tmp_path / "two" / "model")) == set(weights(tmp_path / "one" / "model"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) and losses[1] == pytest.approx(losses[0], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("engine,extra,tolerance", [
    ("ddp", ["model.lora.r=4", "model.lora.dropout=0"], 1e-2),
    ("fsdp", ["model.lora.r=4", "model.lora.dropout=0"], 1e-2),
    # sharded: weights gathered in bfloat16 (FSDP's mixed precision) where one process autocasts
    ("fsdp", ["model.dtype=bfloat16"], 0.1),
    ("deepspeed-zero2.yaml", ["model.lora.r=4", "model.lora.dropout=0", "model.merge_lora=true"], 1e-2),
    # DeepSpeed's bf16 mode: bfloat16 weights, activations and gradients, float32 master weights
    ("deepspeed-zero3.yaml", ["model.dtype=bfloat16"], 0.1),
], ids=["LoRA DDP", "LoRA FSDP", "bfloat16 FSDP", "LoRA ZeRO-2", "bfloat16 ZeRO-3"])
def test_lora_and_bfloat16_train_under_several_processes_as_in_one(tiny_model_dir, tmp_path, tmp_path_factory,
                                                                     engine, extra, tolerance):
    """LoRA (the reference is the adapter switched off: no second model) and bfloat16 mixed
    precision with float32 master weights, split over two processes."""
    args = [f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", f"data.pairs={PAIRS_FILE}",
            "train.batch_size=8", "train.max_length=128", "train.learning_rate=1e-3", *extra]
    one = train_one_process(tmp_path_factory, args, tmp_path)
    if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'ilrdpo[deepspeed]')")
    two = launch(["train", *args, f"output_dir={tmp_path / 'two'}"], tmp_path, processes=2,
                 env_extra={"fsdp": FSDP, "ddp": None}.get(engine, DEEPSPEED_ENV),
                 accelerate_config=engine if engine.endswith(".yaml") else None)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    name = "adapter_model.safetensors" if "model.lora.r=4" in extra else "model.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "model" / name), load_file(tmp_path / "two" / "model" / name)
    assert set(a) == set(b)
    start = weights(tiny_model_dir) if name == "model.safetensors" else \
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in a.items()}  # LoRA B starts at zero

    def norm(x: dict) -> float:
        return float(torch.cat([v.float().flatten() for v in x.values()]).norm())

    moved = norm({k: a[k].float() - start[k].float() for k in a})
    # Adam's first steps move each weight by about the learning rate whatever its gradient, so
    # round-off flips single near-zero gradients: the whole update is compared, not one weight
    assert moved > 0 and norm({k: a[k].float() - b[k].float() for k in a}) < tolerance * moved
    if "model.merge_lora=true" in extra:  # merged from the adapter the sharded run saved, as one process merges
        merged = [weights(tmp_path / name / "model" / "merged") for name in ("one", "two")]
        assert set(merged[0]) == set(merged[1]) == set(weights(tiny_model_dir))
        assert max((merged[0][k] - merged[1][k]).abs().max().item() for k in merged[0]) < 1e-3


@pytest.mark.slow
def test_fsdp_run_samples_pairs_and_trains_like_one(run_config, one_process_run):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` (full shard, activation checkpointing)."""
    out = run_config.parent / "fsdp"
    proc = launch(["run", str(run_config), f"output_dir={out}"], run_config.parent, processes=2,
                  accelerate_config="fsdp.yaml")
    assert proc.returncode == 0, proc.stderr
    same_run(out, one_process_run)


@pytest.mark.slow
def test_killed_fsdp_run_resumes_in_one_process_from_its_checkpoint(run_config, one_process_run):
    """The checkpoint holds gathered weights and optimizer state: one unsharded process takes it up."""
    out = run_config.parent / "fsdp-killed"
    args = ["run", str(run_config), f"output_dir={out}", "train.save_steps=1"]
    crashed = launch(args, run_config.parent, processes=2, fault="metrics.partial.jsonl:3", env_extra=FSDP)
    assert crashed.returncode != 0
    assert (out / "iter_1" / "checkpoint" / "state.pt").is_file()
    resumed = launch(args, run_config.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming training from the checkpoint at step 2" in resumed.stderr + resumed.stdout
    same_run(out, one_process_run)


# --- DeepSpeed ZeRO (over gloo on CPU: DeepSpeed's CPU accelerator) --------------------------------

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install 'ilrdpo[deepspeed]')")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("batch,config,processes", [
    ((8, 1), "deepspeed-zero2.yaml", 2), ((1, 4), "deepspeed-zero2.yaml", 2),
    ((8, 1), "deepspeed-zero3.yaml", 2), ((1, 4), "deepspeed-zero3.yaml", 2), ((2, 2), "deepspeed-zero3.yaml", 1)],
    ids=["ZeRO-2 4+4 pairs", "ZeRO-2 1 pair per micro-batch", "ZeRO-3 4+4 pairs", "ZeRO-3 1 pair per micro-batch",
         "ZeRO-3 in one process"])
def test_deepspeed_trains_what_one_plain_process_trains(tiny_model_dir, tmp_path, tmp_path_factory, batch, config,
                                                        processes):
    """ZeRO partitions optimizer state and gradients (3: weights too) and averages gradients over
    processes; ilrdpo's weighting, lockstep passes and unmanaged accumulation give the plain
    one-process update, its losses and its gradient norms (also with the engine in one process)."""
    batch_size, grad_accum = batch
    args = [f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", f"data.pairs={PAIRS_FILE}",
            f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}", "train.max_length=128",
            "train.learning_rate=1e-3", "train.max_grad_norm=0.5"]
    one = train_one_process(tmp_path_factory, args, tmp_path)
    two = launch(["train", *args, f"output_dir={tmp_path / 'two'}"], tmp_path, processes=processes,
                 accelerate_config=config, env_extra=DEEPSPEED_ENV)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    moved = largest_gap(tmp_path / "one" / "model", tiny_model_dir)
    assert largest_gap(tmp_path / "two" / "model", tmp_path / "one" / "model") < SUMMATION_NOISE * moved
    assert set(weights(tmp_path / "two" / "model")) == set(weights(tmp_path / "one" / "model"))
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    assert len(rows[0]) == len(rows[1])
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [r[key] for r in rows[1]] == pytest.approx([r[key] for r in rows[0]], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_run_samples_pairs_and_trains_like_one(run_config, one_process_run):
    """`accelerate launch --config_file configs/accelerate/deepspeed-zero3.yaml ... run`: weights
    partitioned for training, the saved model gathered whole for the next iteration's sampling."""
    out = run_config.parent / "zero3"
    proc = launch(["run", str(run_config), f"output_dir={out}"], run_config.parent, processes=2,
                  accelerate_config="deepspeed-zero3.yaml", env_extra=DEEPSPEED_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_run(out, one_process_run)


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("crash,resume", [("deepspeed-zero2.yaml", None), (None, "deepspeed-zero3.yaml")],
                         ids=["killed under ZeRO-2, resumed in one process", "killed in one process, resumed under ZeRO-3"])
def test_a_killed_deepspeed_round_resumes_across_engines(run_config, one_process_run, crash, resume):
    """Checkpoints hold whole weights and AdamW moments: a round killed under ZeRO resumes in one
    process, and a single-process checkpoint resumes under ZeRO, to the uninterrupted result."""
    out = run_config.parent / f"resume-{crash}-{resume}"
    args = ["run", str(run_config), f"output_dir={out}", "train.save_steps=1"]

    def go(config, fault=None):
        return launch(args, run_config.parent, processes=2 if config else 1, fault=fault, accelerate_config=config,
                      env_extra=DEEPSPEED_ENV)

    crashed = go(crash, fault="metrics.partial.jsonl:3")
    assert crashed.returncode != 0
    assert (out / "iter_1").is_dir(), crashed.stderr[-3000:]
    assert (out / "iter_1" / "checkpoint" / "state.pt").is_file()
    resumed = go(resume)
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

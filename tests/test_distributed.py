"""Several processes (torchrun, gloo on CPU; `accelerate launch --multi_gpu` on GPUs) give what
one process gives: the same samples, pairs and evaluation answers, and trained weights equal up to
float summation order; a killed multi-process run resumes, with any number of processes, to the
single-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SCORER
from ilrdpo import distributed

PAIRS_FILE = Path(__file__).resolve().parents[1] / "examples" / "pairs.jsonl"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def launch(args: list[str], cwd: Path, processes: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    command = TORCHRUN + [f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ILRDPO_FAULT", None)
    if fault:
        env["ILRDPO_FAULT"] = fault
    return subprocess.run(command + ["-m", "ilrdpo", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


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
eval: {{greedy: false, max_new_tokens: 4}}
seed: 0
""")
    return config


@pytest.fixture(scope="module")
def one_process_run(run_config) -> Path:
    out = run_config.parent / "one"
    proc = launch(["run", str(run_config), f"output_dir={out}"], run_config.parent)
    assert proc.returncode == 0, proc.stderr
    return out


def same_run(actual: Path, expected: Path) -> None:
    for t in (1, 2):
        for name in ("candidates.jsonl", "pairs.jsonl", "eval_answers.jsonl"):
            assert (actual / f"iter_{t}" / name).read_text() == (expected / f"iter_{t}" / name).read_text(), name
    moved = largest_gap(expected / "iter_2" / "model", expected / "iter_1" / "model")
    # Adam divides by small second moments: float summation order shows at ~0.3% of the step here
    assert largest_gap(actual / "iter_2" / "model", expected / "iter_2" / "model") < 1e-2 * moved
    assert not [p for p in actual.rglob("*.rank*")]  # progress files of the processes are gone


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tiny_model_dir, tmp_path):
    """`ilrdpo train` with the global batch of the config (8 pairs a step), split 4 + 4."""
    args = [f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", f"data.pairs={PAIRS_FILE}",
            "train.batch_size=8", "train.max_length=128", "train.learning_rate=1e-3"]
    one = launch(["train", *args, f"output_dir={tmp_path / 'one'}"], tmp_path)
    two = launch(["train", *args, f"output_dir={tmp_path / 'two'}"], tmp_path, processes=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    moved = largest_gap(tmp_path / "one" / "model", tiny_model_dir)
    assert largest_gap(tmp_path / "two" / "model", tmp_path / "one" / "model") < 1e-2 * moved
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


@pytest.mark.parametrize("variable", sorted(distributed.SHARDING_ENGINES))
def test_a_sharding_engine_is_refused_in_one_line(monkeypatch, capsys, variable):
    """FSDP and DeepSpeed configs of accelerate would silently run as full replicas: refused."""
    from ilrdpo import cli

    monkeypatch.setenv(variable, "true")
    monkeypatch.setattr(sys, "argv", ["ilrdpo", "config-help"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: accelerate config:") and "multi-gpu.yaml" in err and len(err.splitlines()) == 1

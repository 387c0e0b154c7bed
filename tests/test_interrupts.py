"""Ctrl-C and SIGTERM (ilrdpo.interrupts): one line, the shell's exit status, files that resume.

A real `ilrdpo run` subprocess on the tiny Llama is held inside a chosen stage (ILRDPO_WAIT, after a
write of that stage: ilrdpo.faults) and sent SIGINT or SIGTERM there; the same command, launched
again, resumes that stage and is stopped in the next one, and so on through every stage; the last
resume runs to the end in this process and must give the files of one uninterrupted run (the
module's reference).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import SCORER, console_script, shared_folder
from ilrdpo import interrupts
from ilrdpo.config import build_config
from ilrdpo.loop import run_iterations
from ilrdpo.rundir import STAGES

# iteration 1's stages, each held after a write it makes (counted from the process's start, which
# resumes the stage before: iteration 0's evaluation is done by then, so eval_answers.jsonl's first
# write is iteration 1's)
WAIT_IN = {"generate": "generation.partial.jsonl:2", "score": "scores.partial.jsonl:1", "pair": "pairs.jsonl:1",
           "train": "metrics.partial.jsonl:2", "eval": "eval_answers.jsonl:1"}
COMPARED = ["iter_0/eval_answers.jsonl", "iter_1/candidates.jsonl", "iter_1/pairs.jsonl", "iter_1/ref_logps.json",
            "iter_1/model/model.safetensors", "iter_1/eval_answers.jsonl"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "ILRDPO_QUIET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


@pytest.fixture(scope="module")
def raw_config(tiny_model_dir, tmp_path_factory):
    """raw_config(output_dir): one iteration of the tiny Llama, 4 prompts x 2 samples, 2 eval prompts."""
    folder = tmp_path_factory.mktemp("prompts")
    train, evaluation = folder / "prompts.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "id": f"t{i}"}) + "\n" for i, p in
                             enumerate(["Name a colour.", "What do bees make?", "Say hello.", "What is 2 + 2?"])))
    evaluation.write_text("".join(json.dumps({"prompt": p, "id": f"e{i}"}) + "\n" for i, p in
                                  enumerate(["What is ice?", "Name a planet."])))

    def make(output_dir: Path) -> dict:
        return {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
                "data": {"prompts": str(train), "eval_prompts": str(evaluation)},
                "generation": {"num_samples": 2, "max_new_tokens": 8, "temperature": 1.0, "batch_size": 2},
                "scoring": {"type": "python", "function": f"{SCORER}:char_count"},
                "pairing": {"skip_truncated": False},
                "train": {"batch_size": 1, "learning_rate": 1e-3, "epochs": 1, "warmup_ratio": 0.0,
                          "max_length": 128},
                "iterations": {"count": 1}, "eval": {},
                "output_dir": str(output_dir), "seed": 0}

    return make


@pytest.fixture(scope="module")
def reference(raw_config, tmp_path_factory) -> Path:
    """One uninterrupted run, shared by the xdist workers."""
    folder = shared_folder(tmp_path_factory, "interrupts_reference",
                           lambda folder: run_iterations(build_config(raw_config(folder / "run"))))
    return folder / "run"


def interrupt_in(command: list[str], wait: str, signum: int, log: Path) -> tuple[int, list[str], list[str]]:
    """Start command held after the write `wait`, send signum there; (exit status, stderr lines
    before the hold, after it)."""
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle, env=env(ILRDPO_WAIT=wait))
    try:
        deadline = time.monotonic() + 240
        while "waiting after write" not in log.read_text():
            assert process.poll() is None, f"ended before {wait}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"never reached {wait}:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    lines = log.read_text().splitlines()
    held = next(i for i, line in enumerate(lines) if line.startswith("waiting after write"))
    return process.returncode, lines[:held], lines[held + 1:]


def resumed_line(stage: str) -> str:
    """What a run says when it resumes a run stopped in iteration 1's `stage`."""
    before = STAGES[:STAGES.index(stage)]
    reused = "iteration 0 eval" + (f"; iteration 1 {', '.join(before)}" if before else "")
    return (f"resuming: reusing finished {reused}; restarting iteration 1 {stage} (keeping its finished batches "
            "or checkpoint, if any)")


@pytest.mark.slow  # a CLI subprocess per stage
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_in_any_stage_stops_in_one_line_and_resumes(raw_config, reference, tmp_path, capsys, signum):
    """The signal in each stage of iteration 1 in turn, each launch resuming the stage the one
    before was stopped in: the shell's status, one line, the stage started and not finished, and
    the files of the uninterrupted run at the end."""
    out = tmp_path / "run"
    raw = raw_config(out)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    for previous, stage in zip([None, *STAGES], STAGES):
        status, said, after = interrupt_in([*console_script(), "run", str(config_path)], WAIT_IN[stage], signum,
                                           tmp_path / f"{stage}.log")
        assert status == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], stage
        assert after == [f"stopped in iteration 1, stage {stage}; rerun the same command to resume"]
        state = json.loads((out / "state.json").read_text())
        assert stage in state["started"]["1"] and stage not in state["finished"].get("1", [])
        assert previous is None or resumed_line(previous) in said, (previous, said)

    run_iterations(build_config(raw))  # the same command, resumed (in this process)
    assert resumed_line(STAGES[-1]) in capsys.readouterr().err.splitlines()
    for name in COMPARED:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(out.rglob("*.partial.jsonl")) and not list(out.rglob(".*.tmp"))


@pytest.mark.slow  # a subprocess
def test_a_second_sigint_exits_at_once(tmp_path):
    """While the first interrupt unwinds slowly (a `finally` that takes a minute), a second Ctrl-C
    ends the process at once with status 130."""
    script = ("import time\nfrom ilrdpo import interrupts\n"
              "with interrupts.handled():\n    try:\n        print('ready', flush=True)\n        time.sleep(60)\n"
              "    finally:\n        time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env())
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        start = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
        elapsed = time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and elapsed < 5
    assert process.stderr.read().strip() == "stopped at once"


@pytest.mark.unit
def test_the_line_names_the_innermost_stage_and_the_outermost_way_to_resume():
    with pytest.raises(interrupts.Interrupted) as stop, interrupts.where(resume="rerun it with --resume"), \
            interrupts.where("the run"), interrupts.where("iteration 2, stage train"):
        raise interrupts.Interrupted(signal.SIGTERM)
    assert stop.value.message() == "stopped in iteration 2, stage train; rerun it with --resume"
    assert stop.value.exit_code == 143
    assert interrupts.Interrupted(signal.SIGINT).message() == "stopped"  # a command that does not resume

"""scripts/gpu_checks.sh, the one command that runs every GPU check, kept from rotting between GPU
runs: its CPU dry run goes through the same benchmark scripts at tiny shapes and must pass and
write every log and result line; a failing check must show in the exit status and the summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_checks.sh"
CHECKS = ("train", "generation", "profile", "weights", "iteration", "zero")


def run_checks(*args: str, env_extra: dict[str, str] | None = None, timeout: int = 600):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False,
                          cwd=ROOT)


@pytest.mark.slow
def test_the_dry_run_passes_and_writes_every_log_and_result_line(tokenizer_dir, tmp_path):
    logs = tmp_path / "logs"
    proc = run_checks("--dry-run", "--out", str(logs), "--tokenizer", str(tokenizer_dir))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == f"logs: {logs}"
    for name in CHECKS:
        assert (logs / f"{name}.log").stat().st_size > 0, name
    summary = (logs / "summary.txt").read_text()
    assert summary.startswith("scripts/gpu_checks.sh --dry-run ")
    assert "CPU dry run" in (logs / "device.txt").read_text()
    for name in CHECKS:
        assert f"== {name}: ok in " in summary, name
    expected = ["2 tests collected", "1 test collected",  # tests/gpu; the ZeRO-3 test by its id
                "ilrdpo: tokens/s=", "trl: tokens/s=", "TFLOP/s", "divergence guard", "ilrdpo/trl throughput=",
                "ilrdpo (auto) against:", "ilrdpo/generate generation=", "ilrdpo compact profile: 1 run of batch 8s;",
                "profile: 1 steps; self CPU time", "aten::mm",
                "one iteration in", "result: every check passed"]
    for line in expected:
        assert line in summary, line


@pytest.mark.smoke
def test_a_failing_check_names_itself_in_the_summary_and_the_exit_status(tokenizer_dir, tmp_path):
    """pytest refuses an unknown option in PYTEST_ADDOPTS: both pytest checks fail, each runs in
    its turn all the same, the exit status is the sum of their values (weights 32 + zero 128) and
    the summary names both; the checks not selected leave no log."""
    logs = tmp_path / "logs"
    proc = run_checks("--dry-run", "--only", "zero,weights", "--out", str(logs), "--tokenizer", str(tokenizer_dir),
                      env_extra={"PYTEST_ADDOPTS": "--no-such-option"})
    assert proc.returncode == 32 + 128, proc.stdout[-3000:]
    summary = (logs / "summary.txt").read_text()
    assert "== zero: FAILED: exit status 4" in summary and "== weights: FAILED: exit status 4" in summary
    assert "result: FAILED: weights zero; exit status 160" in summary
    assert not (logs / "train.log").exists()


@pytest.mark.smoke
@pytest.mark.parametrize("args,message", [
    (["--only", "nope"], "--only: no check named 'nope'"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
    (["--out"], "--out needs a folder"),
])
def test_bad_usage_is_one_line_and_exit_status_2(args, message, tmp_path):
    proc = run_checks(*args, "--out", str(tmp_path / "logs")) if args != ["--out"] else run_checks(*args)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"gpu_checks.sh: {message}") and line.endswith("(see --help)")
    assert not (tmp_path / "logs").exists()

"""The offline demo: bundled data checks (fast) and the quick demo end to end (slow, CI runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ilrdpo.demo import bundled_prompts, demo_configs
from ilrdpo.records import read_prompts


def test_bundled_prompts_are_split_and_carry_references():
    train, held_out = read_prompts(bundled_prompts("train")), read_prompts(bundled_prompts("eval"))
    assert len(train) + len(held_out) >= 300 and len(held_out) >= 60
    assert all(p.reference for p in train + held_out)
    normalise = lambda text: " ".join(text.lower().split())
    assert not {normalise(p.prompt) for p in train} & {normalise(p.prompt) for p in held_out}


def test_demo_arms_differ_only_in_alpha(tmp_path):
    configs = demo_configs(tmp_path, quick=True)
    idpo, ilrdpo = configs["idpo"].model_dump(), configs["ilrdpo"].model_dump()
    assert idpo["loss"].pop("alpha") == 0.0 and ilrdpo["loss"].pop("alpha") > 0
    assert idpo.pop("output_dir") != ilrdpo.pop("output_dir")
    assert idpo == ilrdpo
    # the eval prompts are never trained on
    train = {p.id for p in read_prompts(configs["idpo"].data.prompts)}
    assert not train & {p.id for p in read_prompts(configs["idpo"].data.eval_prompts)}


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """`ilrdpo demo --quick`: both arms, a report with its table and plots, within its budget."""
    env = {**os.environ, "ILRDPO_QUIET": "1", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ilrdpo.cli", "demo", "--quick", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "idpo" in report and "ilrdpo" in report
    for png in (tmp_path / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png.name}" in report
    for arm in ("idpo", "ilrdpo"):
        state = json.loads((tmp_path / arm / "state.json").read_text())
        assert all("eval" in stages for stages in state["finished"].values())
        assert (tmp_path / arm / "iter_2" / "eval.json").exists()
    # iteration 1's samples are shared: the same base model, prompts and seed
    same = [(tmp_path / arm / "iter_1" / "pairs.jsonl").read_text() for arm in ("idpo", "ilrdpo")]
    assert same[0] == same[1]
    print(f"quick demo: {elapsed:.0f} s")

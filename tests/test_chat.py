"""`ilrdpo chat` driven through a pipe (smoke tier, tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two CLI subprocesses, each loading torch and the model


def chat(args: list[str], stdin: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "ilrdpo"
    env = {**os.environ, "ILRDPO_QUIET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(script), "chat", *args], check=False, input=stdin, capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_piped_chat_keeps_history_saves_and_resets(tiny_model_dir, tmp_path):
    proc = chat(["--model", str(tiny_model_dir), "--max-new-tokens", "5"],
                "Hello there\nHow are you?\n/save first.json\n/reset\nAgain\n/save second.json\n/quit\nignored\n",
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = json.loads((tmp_path / "first.json").read_text())
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in first if m["role"] == "user"] == ["Hello there", "How are you?"]
    second = json.loads((tmp_path / "second.json").read_text())
    assert [m["content"] for m in second if m["role"] == "user"] == ["Again"]  # /reset forgot the rest
    assert "(history cleared)" in proc.stdout and "ignored" not in json.dumps(second)


def test_best_of_shows_every_candidate_with_its_score(tiny_model_dir, tmp_path):
    (tmp_path / "s.py").write_text("def score(prompts, completions, **kwargs):\n"
                                   "    return [float(len(c)) for c in completions]\n")
    (tmp_path / "scorer.yaml").write_text(f"type: python\nfunction: {tmp_path / 's.py'}:score\n")
    proc = chat(["--model", str(tiny_model_dir), "--best-of", "3", "--scorer", str(tmp_path / "scorer.yaml"),
                 "--verbose", "--max-new-tokens", "6", "--temperature", "1.0"], "Tell me something\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    candidates = [line for line in lines if line.startswith(("  * [", "    ["))]
    assert len(candidates) == 3
    scores = [float(line.split("[")[1].split(",")[0]) for line in candidates]
    kept = next(line for line in candidates if line.startswith("  * ["))
    assert float(kept.split("[")[1].split(",")[0]) == max(scores)  # the longest answer wins under this scorer

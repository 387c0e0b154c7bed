"""`ilrdpo chat` on the tiny model: through a pipe (CLI subprocesses: slow tier) and in this
process (ilrdpo.chat.run_chat with text streams: smoke tier)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ilrdpo.chat import run_chat
from ilrdpo.config import GenerationSettings


def chat(args: list[str], stdin: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "ilrdpo"
    env = {**os.environ, "ILRDPO_QUIET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(script), "chat", *args], check=False, input=stdin, capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.slow
def test_piped_best_of_chat_keeps_history_saves_resets_and_shows_every_candidate(tiny_model_dir, tmp_path):
    """One console-script process through a pipe: history, /save, /reset, /quit, and best-of-3 with
    --verbose showing each reply's candidates with their scores, the kept one the best."""
    (tmp_path / "s.py").write_text("def score(prompts, completions, **kwargs):\n"
                                   "    return [float(len(c)) for c in completions]\n")
    (tmp_path / "scorer.yaml").write_text(f"type: python\nfunction: {tmp_path / 's.py'}:score\n")
    proc = chat(["--model", str(tiny_model_dir), "--best-of", "3", "--scorer", str(tmp_path / "scorer.yaml"),
                 "--verbose", "--max-new-tokens", "6", "--temperature", "1.0"],
                "Hello there\nHow are you?\n/save first.json\n/reset\nAgain\n/save second.json\n/quit\nignored\n",
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = json.loads((tmp_path / "first.json").read_text())
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in first if m["role"] == "user"] == ["Hello there", "How are you?"]
    second = json.loads((tmp_path / "second.json").read_text())
    assert [m["content"] for m in second if m["role"] == "user"] == ["Again"]  # /reset forgot the rest
    assert "(history cleared)" in proc.stdout and "ignored" not in json.dumps(second)
    candidates = [line for line in proc.stdout.splitlines() if line.startswith(("  * [", "    ["))]
    assert len(candidates) == 3 * 3  # three replies
    for reply in (candidates[:3], candidates[3:6], candidates[6:]):
        scores = [float(line.split("[")[1].split(",")[0]) for line in reply]
        kept = [line for line in reply if line.startswith("  * [")]
        assert len(kept) == 1 and float(kept[0].split("[")[1].split(",")[0]) == max(scores)  # the longest wins


def chat_in_process(model_dir: Path, lines: str, **options) -> tuple[list[dict], str]:
    out = io.StringIO()
    history = run_chat(str(model_dir), stdin=io.StringIO(lines), stdout=out, **options)
    return history, out.getvalue()


@pytest.mark.smoke
def test_an_unknown_command_is_refused_with_the_list_of_commands(tiny_model_dir):
    history, out = chat_in_process(tiny_model_dir, "/bogus\n//etc is a path\n",
                                   generation=GenerationSettings(max_new_tokens=2))
    assert "(unknown command /bogus; the commands are /reset, /save FILE, /quit;" in out
    assert [m["content"] for m in history if m["role"] == "user"] == ["/etc is a path"]  # // sends a leading /


@pytest.mark.smoke
def test_save_keeps_the_system_prompt(tiny_model_dir, tmp_path):
    target = tmp_path / "chat.json"
    chat_in_process(tiny_model_dir, f"Hello\n/save {target}\n", system_prompt="Answer in French.",
                    generation=GenerationSettings(max_new_tokens=2))
    saved = json.loads(target.read_text())
    assert saved[0] == {"role": "system", "content": "Answer in French."}
    assert [m["role"] for m in saved[1:]] == ["user", "assistant"]


@pytest.mark.smoke
@pytest.mark.parametrize("best_of", [1, 2])
def test_a_reply_cut_at_the_token_limit_is_marked(tiny_model_dir, tmp_path, best_of):
    """The random tiny model does not stop on its own within 3 tokens: every reply is cut."""
    (tmp_path / "s.py").write_text("def score(prompts, completions, **kwargs):\n    return [0.0] * len(completions)\n")
    from ilrdpo.config import ScoringSettings

    scorer = ScoringSettings(type="python", function=f"{tmp_path / 's.py'}:score") if best_of > 1 else None
    history, out = chat_in_process(tiny_model_dir, "Hello\n", best_of=best_of, scorer=scorer,
                                   generation=GenerationSettings(max_new_tokens=3, temperature=1.0))
    assert out.rstrip().endswith("[cut at the 3-token limit; --max-new-tokens raises it]")
    assert "cut at" not in history[-1]["content"]  # the mark is for the reader, not the history


@pytest.mark.slow
def test_ctrl_c_during_a_reply_exits_130_at_once(tiny_model_dir, tmp_path):
    """SIGINT while a long reply streams: the decoding thread stops at its next token, status 130."""
    script = Path(sys.executable).parent / "ilrdpo"
    env = {**os.environ, "ILRDPO_QUIET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([str(script), "chat", "--model", str(tiny_model_dir), "--max-new-tokens", "480",
                                "--temperature", "1.0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        process.stdin.write(b"Tell me a long story\n")
        process.stdin.flush()
        assert process.stdout.read(1)  # the reply has started
        process.send_signal(signal.SIGINT)
        start = time.monotonic()
        process.wait(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and elapsed < 3, (process.returncode, elapsed)
    assert process.stderr.read().decode().strip().splitlines()[-1] == "stopped"

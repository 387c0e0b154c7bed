"""The run directory (smoke tier): one process at a time, nothing finished is damaged, debris removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import EXAMPLES, first_lines, short_pairs
from ilrdpo.config import build_config
from ilrdpo.errors import UserInputError
from ilrdpo.offline import run_offline
from ilrdpo.rundir import RunDir

pytestmark = pytest.mark.smoke

PAIRS = short_pairs()


# --- the run directory -------------------------------------------------------------------------------


def offline_config(tiny_model_dir, out: Path, **extra):
    raw = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
           "data": {"pairs": str(first_lines(EXAMPLES / "pairs.jsonl", 4, out.parent / "data"))},
           "train": {"batch_size": 2, "max_length": 128}, "output_dir": str(out), **extra}
    return build_config(raw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_process_on_a_run_directory_is_refused_and_a_killed_holder_frees_it(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ilrdpo.rundir import RunDir; d = RunDir(sys.argv[1]); d.lock('ilrdpo run'); d.announce(); "
        "print('locked', flush=True); time.sleep(60)"), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserInputError, match=rf"{out}: in use by pid {holder.pid} on .*ilrdpo run"):
            run_offline(offline_config(tiny_model_dir, out))
        assert sorted(p.name for p in out.iterdir()) == ["lock"]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    run_offline(offline_config(tiny_model_dir, out))  # the kernel released the dead holder's lock
    assert (out / "model" / "model.safetensors").is_file()


def test_train_into_a_finished_folder_refuses_without_overwrite_and_changes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_offline(offline_config(tiny_model_dir, out))
    before = snapshot(out)
    with pytest.raises(UserInputError, match="a trained model is already there; pass --overwrite"):
        run_offline(offline_config(tiny_model_dir, out, loss={"beta": 0.3}))
    assert snapshot(out) == before
    run_offline(offline_config(tiny_model_dir, out, loss={"beta": 0.3}), overwrite=True)
    history = out / "config_history" / "001.yaml"
    assert history.read_bytes() == before["config.yaml"]  # the config of the replaced model is kept


def test_bad_pairs_file_writes_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    out = tmp_path / "run"
    with pytest.raises(UserInputError, match=f"{bad}:1: missing field 'rejected'"):
        run_offline(offline_config(tiny_model_dir, out, data={"pairs": str(bad)}))
    assert not out.exists()


def test_debris_of_killed_writers_is_removed_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    (out / "iter_1" / "model.staging").mkdir(parents=True)
    (out / "iter_1" / ".candidates.jsonl.x1y2.tmp").write_text("half a file")
    (out / "iter_1" / "candidates.jsonl").write_text("{}\n")
    (out / "notes.old").mkdir()  # a user's own folder: not ours to remove
    (out / "notes.old" / ".draft.tmp").write_text("keep")
    removed = RunDir(out).remove_debris()
    assert len(removed) == 2
    assert [p.name for p in (out / "iter_1").iterdir()] == ["candidates.jsonl"]
    assert (out / "notes.old" / ".draft.tmp").read_text() == "keep"




def test_resume_line_names_what_is_reused_and_what_restarts(tmp_path):
    from ilrdpo.runstate import RunState

    state = RunState(tmp_path / "state.json")
    assert state.resume_line() is None  # a fresh run directory says nothing
    state.finished = {0: ["eval"], 1: ["generate", "score"]}
    state.started = {0: ["eval"], 1: ["generate", "score", "pair"]}
    assert state.resume_line() == ("resuming: reusing finished iteration 0 eval; iteration 1 generate, score; "
                                   "restarting iteration 1 pair (keeping its finished batches or checkpoint, if any)")


def test_opened_runs_the_checks_before_naming_the_holder(tmp_path):
    """RunDir.opened, the one way run, train and tune take a directory: a check that refuses leaves
    no lock file and no holder behind; the holder is written into the lock only after the checks."""
    from ilrdpo.errors import UserInputError
    from ilrdpo.rundir import RunDir

    folder = tmp_path / "run"
    rundir = RunDir(folder)

    def refuse():
        raise UserInputError("refused")

    with pytest.raises(UserInputError, match="refused"), rundir.opened("ilrdpo run", refuse):
        pass
    assert not (folder / "lock").exists()
    during_checks = []
    with rundir.opened("ilrdpo train", lambda: during_checks.append((folder / "lock").read_text())):
        holder = (folder / "lock").read_text()
    assert during_checks == [""] and "ilrdpo train" in holder and f"pid {os.getpid()}" in holder
    assert not (folder / "lock").exists()

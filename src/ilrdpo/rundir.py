"""The run directory: the one owner of its layout, its state, its config history and its lock.

    OUT/
      config.yaml          the config in force (earlier ones in config_history/, never overwritten)
      config_history/      001.yaml, 002.yaml, ...: every config this directory ran with before
      state.json           started and finished stages per iteration, the alpha each train stage
                           used, and the content hash of every input file (ilrdpo.runstate)
      lock                 held (flock) by the one process working here, removed when it ends; a
                           killed process leaves the file, but the kernel released its lock
      timings.json         seconds per stage and iteration
      inputs/              data handed over through the Python API (api.py), so the run stays resumable
      iter_T/              the files of iteration T (STAGE_FILES, PARTIAL_FILES, ANCHOR_FILES, attempt_K/)
      heldout/             the demo's second held-out set: iter_K.json and iter_K_answers.jsonl

No other module builds or discovers a path inside a run directory: they ask a RunDir (a test
checks that no other module spells "iter_").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ilrdpo import ranks
from ilrdpo.config import Config, config_to_yaml, load_config
from ilrdpo.errors import DiskFullError, UserInputError, disk_writes
from ilrdpo.files import atomic_write_text, read_json_file
from ilrdpo.runstate import RunState

# The stages of an iteration in order, and the files each one writes in iter_T/.
# Each sampled answer's token ids and log-prob under the sampler (ilrdpo.sampled_reference).
SAMPLE_LOGPS_FILE = "sample_logps.jsonl"
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "generate": ("candidates.jsonl", SAMPLE_LOGPS_FILE),
    "score": ("candidates.jsonl",),
    "pair": ("pairs.jsonl",),
    "train": ("metrics.jsonl", "ref_logps.json", "model"),
    "eval": ("eval_answers.jsonl", "eval_samples.jsonl", "eval.json"),
}
STAGES = list(STAGE_FILES)

# Progress files of stages in progress: finished batches, picked up by a resumed run.
# The initial model's length anchors (iter_0/): its answers when told to be concise or verbose.
ANCHOR_FILES = {"concise": "eval_answers_concise.jsonl", "verbose": "eval_answers_verbose.jsonl"}
# Sampled eval answers (experimental.eval_samples > 0), next to the greedy eval_answers.jsonl.
SAMPLES_FILE = "eval_samples.jsonl"

# What a finished stage must have left in iter_T/ (eval_samples.jsonl only with experimental.eval_samples > 0).
REQUIRED_FILES = {"generate": ("candidates.jsonl",), "score": ("candidates.jsonl",), "pair": ("pairs.jsonl",),
                  "train": ("model", "ref_logps.json", "metrics.jsonl"), "eval": ("eval.json",)}

PARTIAL_FILES = {"generate": "generation.partial.jsonl", "score": "scores.partial.jsonl",
                 "train": "metrics.partial.jsonl"}


def next_number(folder: Path, pattern: str) -> int:
    """One more than the highest NNN among folder's entries matching pattern: never reused."""
    numbers = [int(p.stem) for p in folder.glob(pattern) if p.stem.isdigit()] if folder.is_dir() else []
    return max(numbers, default=0) + 1


class RunDir:
    """Paths and bookkeeping of one run directory (`ilrdpo run`, or one `ilrdpo train` folder)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise UserInputError(f"output_dir '{self.root}' is a file, not a folder")
        self._lock_handle = None

    # --- paths ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def history_dir(self) -> Path:
        return self.root / "config_history"

    @staticmethod
    def iteration_name(t: int) -> str:
        """iter_T: the folder of iteration T, relative to the root (for messages)."""
        return f"iter_{t}"

    def iteration(self, t: int) -> Path:
        return self.root / self.iteration_name(t)

    def attempt(self, t: int, k: int) -> Path:
        """iter_T/attempt_K/: the files of a round that alpha control's retries trained again."""
        return self.iteration(t) / f"attempt_{k}"

    @property
    def trial_path(self) -> Path:
        """trial.json of a run that `ilrdpo tune` made (its study, trial number, parameters, objectives)."""
        return self.root / "trial.json"

    @property
    def timings_path(self) -> Path:
        return self.root / "timings.json"

    @property
    def inputs_dir(self) -> Path:
        return self.root / "inputs"

    def heldout(self, k: int, answers: bool = False) -> Path:
        """The demo's second held-out set: heldout/iter_K.json (summary) or iter_K_answers.jsonl."""
        return self.root / "heldout" / (f"iter_{k}_answers.jsonl" if answers else f"iter_{k}.json")

    def heldout_iterations(self) -> dict[int, Path]:
        """{K: heldout/iter_K.json} of the summaries on disk, in order."""
        return self._numbered(self.root / "heldout", "iter_*.json", lambda p: p.stem)

    def file(self, t: int, name: str) -> Path:
        return self.iteration(t) / name

    def partial(self, t: int, stage_name: str) -> Path:
        return self.file(t, PARTIAL_FILES[stage_name])

    def checkpoint(self, t: int | None = None) -> Path:
        """Mid-training checkpoint of iteration t's train stage (or of `ilrdpo train`)."""
        return (self.root if t is None else self.iteration(t)) / "checkpoint"

    def iterations(self) -> dict[int, Path]:
        """{T: iter_T/} of the iteration folders on disk, in order."""
        return self._numbered(self.root, "iter_*", lambda p: p.name if p.is_dir() else "")

    @staticmethod
    def _numbered(folder: Path, pattern: str, stem) -> dict[int, Path]:
        found = {}
        for path in folder.glob(pattern):
            suffix = stem(path).removeprefix("iter_")
            if suffix.isdigit():
                found[int(suffix)] = path
        return dict(sorted(found.items()))

    def state(self) -> RunState:
        return RunState(self.state_path)

    def redo_hint(self, t: int) -> str:
        """What to do about a damaged or missing output of a finished stage of iteration t."""
        return (f"delete the folder {self.iteration(t)} and run the same command again to redo iteration {t} "
                "(the other iterations are kept)")

    def reconcile(self, state: RunState) -> None:
        """state.json against what is on disk, before a run goes on: an iteration whose folder is
        gone (the way to redo it) is forgotten, to be done again; a finished stage whose output is
        gone otherwise is one line naming it and that way (nothing is written either way). The model
        of an iteration a later finished round superseded is not required: iterations.keep_models
        removes it, and nothing but a redo from there reads it (which says so)."""
        trained = [t for t, names in state.finished.items() if "train" in names]
        for t in sorted(set(state.finished) | set(state.started)):
            if not self.iteration(t).is_dir():
                state.forget_iteration(t)
                continue
            for stage_name in state.finished.get(t, []):
                for name in REQUIRED_FILES[stage_name]:
                    superseded = name == "model" and any(k > t for k in trained)
                    if not superseded and not self.file(t, name).exists():
                        raise UserInputError(f"{self.file(t, name)}: missing, but state.json has iteration {t}'s "
                                             f"'{stage_name}' stage finished; {self.redo_hint(t)}")

    # --- lock ----------------------------------------------------------------------------------
    def lock(self, command: str) -> None:
        """Take the directory for this process, or refuse naming the holder. The kernel releases
        the lock when the process ends, however it ends. Under several processes the main one
        holds it for all, and all refuse together."""
        refusal = None
        if ranks.is_main():
            try:
                self._lock(command)
            except (UserInputError, DiskFullError) as error:  # every process refuses, none waits
                refusal = (type(error).__name__, str(error))
        refusal = ranks.broadcast(refusal)
        if refusal is not None:
            raise {"DiskFullError": DiskFullError}.get(refusal[0], UserInputError)(refusal[1])

    def _lock(self, command: str) -> None:
        path = self.root / "lock"
        while True:
            with disk_writes(self.root):
                self.root.mkdir(parents=True, exist_ok=True)
                handle = path.open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise UserInputError(f"{self.root}: in use by {holder}; wait for it to finish or use another "
                                     "output_dir") from None
            if path.exists() and os.fstat(handle.fileno()).st_ino == path.stat().st_ino:
                break
            handle.close()  # the holder removed this file as it finished: lock the one at the path now
        self._lock_handle = handle
        self._command = command

    def announce(self) -> None:
        """Write who holds the lock into it: called once the resume checks have passed, so that a
        refused start changes no byte of the directory."""
        handle = self._lock_handle
        if handle is None:  # not the main process
            return
        with disk_writes(self.root):
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} ({self._command}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            handle.flush()

    @contextlib.contextmanager
    def opened(self, command: str, checks: Callable[[], None] | None = None) -> Iterator[RunDir]:
        """The one way a command takes a run directory: lock it (or refuse, naming the holder), run
        the checks that may still refuse the start (a refusal changes no byte of the directory),
        then write the holder into the lock; unlocked when the block ends."""
        with self.locked(command):
            if checks is not None:
                checks()
            self.announce()
            yield self

    @contextlib.contextmanager
    def locked(self, command: str) -> Iterator[RunDir]:
        self.lock(command)
        try:
            yield self
        finally:
            self.unlock()

    def unlock(self) -> None:
        if self._lock_handle is not None:
            # removed while still held, so that a finished folder has no lock file (a killed holder
            # leaves one behind: harmless, the kernel released it)
            (self.root / "lock").unlink(missing_ok=True)
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    # --- config --------------------------------------------------------------------------------
    def recorded_config(self) -> Config | None:
        return load_config(self.config_path, recorded=True) if self.config_path.exists() else None

    def record_config(self, config: Config) -> None:
        """config.yaml := config; a different earlier config moves to config_history/NNN.yaml."""
        if not ranks.is_main():  # the main process writes
            return
        text = config_to_yaml(config)
        if self.config_path.exists():
            old = self.config_path.read_text(encoding="utf-8")
            if old == text:
                return
            # after the highest number there, never a count: with one entry deleted, a count would
            # name a file that still exists and overwrite it
            atomic_write_text(self.history_dir / f"{next_number(self.history_dir, '*.yaml'):03d}.yaml", old)
        atomic_write_text(self.config_path, text)

    def adopt(self, source: RunDir, stages: dict[int, list[str]], *, same_seed: bool = True) -> None:
        """Copy finished stages' files from another run directory and mark them finished here:
        for work that does not depend on the settings that differ (a tune study's trials, the
        demo's arms and seeds); the one way to share work between runs. Without same_seed the
        sampled eval answers (experimental.eval_samples), which depend on the seed, are left out (and eval.json's
        "sampled" with them): the first evaluation that needs them draws its own."""
        state = self.state()
        for t, names in stages.items():
            self.iteration(t).mkdir(parents=True, exist_ok=True)
            files = {f for name in names for f in STAGE_FILES[name]}
            if t == 0 and "eval" in names:
                files |= set(ANCHOR_FILES.values())
            if not same_seed:
                files.discard(SAMPLES_FILE)
            for name in sorted(files):
                if source.file(t, name).is_file():
                    shutil.copy2(source.file(t, name), self.file(t, name))
            evaluation = read_json_file(self.file(t, "eval.json")) if self.file(t, "eval.json").is_file() else {}
            if not same_seed and isinstance(evaluation, dict) and evaluation.pop("sampled", None) is not None:
                atomic_write_text(self.file(t, "eval.json"), json.dumps(evaluation, indent=1))
            for name in names:
                state.mark(t, name)

    # --- disk ------------------------------------------------------------------------------------
    def prune_models(self, keep: int | None, last: int) -> list[Path]:
        """Remove the saved models of iterations 1..last-keep and every replaced attempt's model of
        iterations 1..last (nothing when keep is None); returns what was removed."""
        if keep is None:
            return []
        found = [self.file(k, "model") for k in self.iterations() if 1 <= k <= last - keep]
        found += [a / "model" for k in self.iterations() if 1 <= k <= last
                  for a in sorted(self.iteration(k).glob("attempt_*"))]
        for path in (removed := [path for path in found if path.is_dir()]):
            shutil.rmtree(path)
        return removed

    # --- redo ------------------------------------------------------------------------------------
    @property
    def replaced_dir(self) -> Path:
        return self.root / "replaced"

    def stage_paths(self, t: int, stage_name: str) -> list[Path]:
        """The files and folders stage `stage_name` of iteration t writes (finished or in progress)."""
        names = list(STAGE_FILES[stage_name])
        if stage_name in PARTIAL_FILES:
            names += [p.name for p in self.iteration(t).glob(PARTIAL_FILES[stage_name] + "*")]  # + .rankR
        if stage_name == "train":
            names += ["checkpoint", *sorted(p.name for p in self.iteration(t).glob("attempt_*"))]
        if stage_name == "eval" and t == 0:
            names += list(ANCHOR_FILES.values())
        return [self.file(t, name) for name in dict.fromkeys(names) if self.file(t, name).exists()]

    def replace(self, dropped: dict[int, list[str]], note: str) -> Path | None:
        """Move the files of the dropped stages into replaced/NNN/iter_T/ (a new NNN each time,
        never reused), with the config and state they were made under and a note of why.
        candidates.jsonl stays in place (copied) when its generate stage is kept."""
        moves = [(t, path) for t, names in sorted(dropped.items()) for name in names
                 for path in self.stage_paths(t, name)]
        if not moves:
            return None
        target = self.replaced_dir / f"{next_number(self.replaced_dir, '[0-9]*'):03d}"
        target.mkdir(parents=True)
        for name in ("config.yaml", "state.json"):
            if (self.root / name).exists():
                shutil.copy2(self.root / name, target / name)
        (target / "README.txt").write_text(note + "\n", encoding="utf-8")
        for t, path in dict.fromkeys(moves):
            if not path.exists():
                continue
            (target / f"iter_{t}").mkdir(exist_ok=True)
            if path.name == "candidates.jsonl" and "generate" not in dropped.get(t, []):  # score redone
                shutil.copy2(path, target / f"iter_{t}" / path.name)
            else:
                os.replace(path, target / f"iter_{t}" / path.name)
        return target

    # --- debris of killed writers --------------------------------------------------------------
    def remove_debris(self) -> list[Path]:
        """Temp files of interrupted atomic writes and staging folders of interrupted model saves.
        Only the names this project writes, only in the folders it writes them: an output_dir
        may hold a user's own files. The main process cleans."""
        if not self.root.is_dir() or not ranks.is_main():
            return []
        folders = [self.root, self.history_dir, *self.iterations().values()]
        folders += [f / "checkpoint" for f in folders]
        debris = [p for f in folders for p in f.glob(".*.tmp") if p.is_file()]
        debris += [f / name for f in folders for name in ("model.staging", "model.old") if (f / name).is_dir()]
        for path in debris:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return debris

"""state.json of a run directory: which stages of which iteration started and finished, the alpha
each train stage decided on (its one home: eval.json, the report and the model card's table read
it from here), the attempts alpha control's retries replaced, and the hash of every input file.
Written atomically, by the main process only."""

from __future__ import annotations

import json
from pathlib import Path

from ilrdpo import ranks
from ilrdpo.errors import UserInputError
from ilrdpo.files import atomic_write_text, read_json_file


class RunState:
    """state.json: what is done, with what alpha, from which inputs. Written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = read_json_file(path) if path.exists() else {}
        if not isinstance(raw, dict):
            raise UserInputError(f"{path}: corrupt state file (not a JSON object); restore it or start a new "
                                 "output_dir")
        self.finished: dict[int, list[str]] = {int(k): v for k, v in raw.get("finished", {}).items()}
        self.started: dict[int, list[str]] = {int(k): v for k, v in raw.get("started", {}).items()}
        # alpha[T]: the per-unit alpha iteration T's train stage decided on when it started (its one
        # home); alpha_setting[T]: the config-level value it came from (differs with experimental.alpha_neutral).
        self.alpha: dict[int, float] = {int(k): v for k, v in raw.get("alpha", {}).items()}
        self.alpha_setting: dict[int, float] = {int(k): v for k, v in raw.get("alpha_setting", {}).items()}
        # attempts[T]: earlier trainings of iteration T that alpha control's retries replaced, each
        # {"alpha", "alpha_setting", "length"}; their files are in iter_T/attempt_K/.
        self.attempts: dict[int, list[dict]] = {int(k): v for k, v in raw.get("attempts", {}).items()}
        # inputs: sha256 of every input file, keyed by the config key that names it.
        self.inputs: dict[str, str] = dict(raw.get("inputs", {}))

    def done(self, iteration: int, stage_name: str) -> bool:
        return stage_name in self.finished.get(iteration, [])

    def start(self, iteration: int, stage_name: str) -> None:
        if stage_name not in self.started.get(iteration, []):
            self.started.setdefault(iteration, []).append(stage_name)
            self.save()

    def mark(self, iteration: int, stage_name: str) -> None:
        if stage_name not in self.finished.get(iteration, []):
            self.finished.setdefault(iteration, []).append(stage_name)
        self.save()

    def forget(self, iteration: int, stage_names: tuple[str, ...]) -> None:
        """Un-mark stages of an iteration (a retried round trains and evaluates again); not saved."""
        for marks in (self.finished, self.started):
            marks[iteration] = [s for s in marks.get(iteration, []) if s not in stage_names]

    def resume_line(self) -> str | None:
        """What a rerun reuses and what it continues, in one line; None when nothing ran yet."""
        finished = [f"iteration {t} {', '.join(names)}" for t, names in sorted(self.finished.items()) if names]
        partial = [f"iteration {t} {name}" for t, names in sorted(self.started.items()) for name in names
                   if not self.done(t, name)]
        parts = (["reusing finished " + "; ".join(finished)] if finished else []) + \
            (["restarting " + ", ".join(partial) + " (keeping its finished batches or checkpoint, if any)"]
             if partial else [])
        return "resuming: " + "; ".join(parts) if parts else None

    def forget_iteration(self, iteration: int) -> None:
        """Everything recorded of one iteration (its folder is gone: it is done again); not saved."""
        for record in (self.finished, self.started, self.alpha, self.alpha_setting, self.attempts):
            record.pop(iteration, None)

    def touched(self) -> dict[int, list[str]]:
        """Stages finished or with partial output on disk: both were made with the old config."""
        return {t: sorted(set(self.finished.get(t, [])) | set(self.started.get(t, [])))
                for t in set(self.finished) | set(self.started)}

    def save(self) -> None:
        if not ranks.is_main():  # one writer; every process holds the same state in memory
            return
        atomic_write_text(self.path, json.dumps(
            {"finished": self.finished, "started": self.started, "alpha": self.alpha,
             "alpha_setting": self.alpha_setting, "attempts": self.attempts, "inputs": self.inputs},
            indent=1))

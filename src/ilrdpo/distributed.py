"""Data parallelism across processes started by `accelerate launch` (or torchrun).

Every process runs the same command and the same stages; the work inside a stage is shared:

- generation: the stage's fixed batches (prompts sorted by length, batch k sampled with seed
  (seed, k)) are dealt round-robin, batch k to process k % W, so every answer is the one a single
  process samples; each process appends its finished batches to its own progress file;
- scoring: chunks of prompts, dealt the same way;
- reference log-probs: micro-batches, dealt the same way;
- training: every micro-batch of an optimizer step is split between the processes, each runs the
  forward and backward of its share with the loss weighted by the step's global pair count, and
  the engine (ilrdpo.engines: replicas, FSDP or DeepSpeed ZeRO) makes the gradients the global
  batch's before the optimizer step: the global batch is the config's whatever the number of
  processes, and the update equals the single-process one up to float summation order.

Results are gathered to every process in the single-process order. Only the main process writes
shared files (each writer asks ranks.is_main(); models and checkpoints through the engine); stages
end with a barrier, so a process reads only what the main process has finished writing. Several
nodes need a folder all of them see (output_dir) and accelerate's own multi-node settings.

The process group is accelerate's, joined by engines.init(); a single process never touches
torch.distributed. This module holds the progress files of the shared stages; who each process
is, and the collectives, are ilrdpo.ranks' (re-exported here for the stages that deal work out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ilrdpo.files import append_jsonl, read_jsonl_tolerant, recover_jsonl
from ilrdpo.ranks import (  # noqa: F401  (re-exported: the stages' view of the processes)
    all_sum,
    barrier,
    broadcast,
    gather_dict,
    is_main,
    mine,
    rank,
    rank_file,
    rank_files,
    world_size,
)


def read_progress(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a stage's progress files (every process's, torn last lines cut off by the main
    process), read by every process before any of them appends again."""
    read = recover_jsonl if is_main() else read_jsonl_tolerant  # the same rows; one process repairs
    rows = [row for file in rank_files(path) for row in read(file)]
    barrier()
    return rows


def append_progress(path: str | Path, row: Any) -> None:
    """One finished row to this process's own progress file."""
    append_jsonl(rank_file(path), row)


def remove_progress(path: str | Path) -> None:
    """A stage's progress files (one per process that wrote one), once its output is written."""
    barrier()  # every process has gathered what it needs from them
    if is_main():
        for file in rank_files(path):
            file.unlink(missing_ok=True)

"""Data parallelism across processes started by `accelerate launch` (or torchrun).

Every process runs the same command and the same stages; the work inside a stage is shared:

- generation: the stage's fixed batches (prompts sorted by length, batch k sampled with seed
  (seed, k)) are dealt round-robin, batch k to process k % W, so every answer is the one a single
  process samples; each process appends its finished batches to its own progress file;
- scoring: chunks of prompts, dealt the same way;
- reference log-probs: micro-batches, dealt the same way;
- training: every micro-batch of an optimizer step is split between the processes, each runs the
  forward and backward of its share with the loss weighted by the step's global pair count, and
  the gradients are summed across processes (torch.distributed all-reduce) before the identical
  optimizer step in each process: the global batch is the config's whatever the number of
  processes, and the update equals the single-process one up to float summation order.

Results are gathered to every process in the single-process order. Only the main process writes
files (records.atomic_write_text, append_jsonl, models, checkpoints); stages end with a barrier,
so a process reads only what the main process has finished writing. Several nodes need a folder
all of them see (output_dir) and accelerate's own multi-node settings.

The process group is accelerate's (PartialState: NCCL on GPUs, gloo on CPUs); a single process
never touches torch.distributed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

SHARDING_ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def init() -> None:
    """Join the process group that `accelerate launch` / torchrun describe in the environment."""
    from ilrdpo.errors import UserInputError

    for variable, engine in SHARDING_ENGINES.items():
        if os.environ.get(variable, "").lower() in ("1", "true"):
            raise UserInputError(f"accelerate config: {engine} is not supported yet (every process holds the whole "
                                 "model and its optimizer state); use configs/accelerate/multi-gpu.yaml")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _initialized():
        from accelerate import PartialState

        from ilrdpo.progress import console

        PartialState()
        if not is_main():  # one voice: the main process prints and draws the progress bars
            console.quiet = True
            os.environ["ILRDPO_QUIET"] = "1"


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_device() -> torch.device:
    """This process's device: its own GPU (LOCAL_RANK) under a launcher, else cuda / cpu."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0)


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def mine(n: int) -> list[int]:
    """The indices of n items (batches, chunks) this process handles: k with k % W == rank."""
    return list(range(rank(), n, world_size()))


def gather_dict(part: dict) -> dict:
    """The union of every process's dict, in every process."""
    if world_size() == 1:
        return part
    parts: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(parts, part)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


def broadcast(value: Any) -> Any:
    """The main process's value, in every process."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (in place; on the tensor's device)."""
    if world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients over processes, flattened into one buffer per dtype and device."""
    if world_size() == 1:
        return
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a process without pairs in this step contributes zeros
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for members in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in members])
        all_sum(flat)
        offset = 0
        for p in members:
            p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()


def rank_file(path: str | Path) -> Path:
    """This process's own progress file: `path` itself in a single process."""
    path = Path(path)
    return path if world_size() == 1 else path.with_name(f"{path.name}.rank{rank()}")


def read_progress(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a stage's progress files (every process's, torn last lines cut off), read by
    every process before any of them appends again."""
    from ilrdpo.records import recover_jsonl

    rows = [row for file in rank_files(path) for row in recover_jsonl(file)]
    barrier()
    return rows


def append_progress(path: str | Path, row: Any) -> None:
    """One finished row to this process's own progress file."""
    from ilrdpo.records import append_jsonl

    append_jsonl(rank_file(path), row, every_process=True)


def rank_files(path: str | Path) -> list[Path]:
    """Every process's progress file for `path`, whatever the number of processes that wrote them."""
    path = Path(path)
    return [path, *sorted(path.parent.glob(f"{path.name}.rank*"))] if path.parent.exists() else [path]

"""Who this process is among the processes of a launch, and the few collectives every stage uses.

The bottom of the project: it imports nothing of ilrdpo, so any module may ask is_main() or
wait at barrier(). A single process (no process group) is rank 0 of a world of 1, and every
collective here is then the identity: a single process never touches torch.distributed. Who
writes a shared file is the caller's decision (`if ranks.is_main(): write...`); each process
writes its own progress file (rank_file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def env_flag(variable: str) -> bool:
    return os.environ.get(variable, "").lower() in ("1", "true", "yes")


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


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


def rank_file(path: str | Path) -> Path:
    """This process's own progress file: `path` itself in a single process."""
    path = Path(path)
    return path if world_size() == 1 else path.with_name(f"{path.name}.rank{rank()}")


def rank_files(path: str | Path) -> list[Path]:
    """Every process's progress file for `path`, whatever the number of processes that wrote them."""
    path = Path(path)
    return [path, *sorted(path.parent.glob(f"{path.name}.rank*"))] if path.parent.exists() else [path]

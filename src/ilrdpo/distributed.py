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

With FSDP (`accelerate launch --config_file configs/accelerate/fsdp.yaml`, torch's FSDP2
`fully_shard`), the training stage shards the weights, gradients and optimizer state across the
processes (each decoder layer one group, then the root): every process runs every micro-batch's
forward and backward in lockstep (one without pairs of its own runs a zero-weighted one), the
engine reduce-scatters the gradients, and the trained weights are gathered once to save them.
Generation, scoring, reference log-probs and evaluation run on whole models, as above: the stage
after training loads the saved model. Checkpoints hold the gathered (full) weights and optimizer
state, so a killed run resumes with any number of processes.

Results are gathered to every process in the single-process order. Only the main process writes
files (records.atomic_write_text, append_jsonl, models, checkpoints); stages end with a barrier,
so a process reads only what the main process has finished writing. Several nodes need a folder
all of them see (output_dir) and accelerate's own multi-node settings.

The process group is accelerate's (PartialState: NCCL on GPUs, gloo on CPUs); a single process
never touches torch.distributed.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import torch


def env_flag(variable: str) -> bool:
    return os.environ.get(variable, "").lower() in ("1", "true", "yes")


def init() -> None:
    """Join the process group that `accelerate launch` / torchrun describe in the environment."""
    from ilrdpo import zero
    from ilrdpo.errors import UserInputError

    zero.check_launch()
    if env_flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "2") != "2":
        raise UserInputError("accelerate config: fsdp_version 1 is not supported; set fsdp_config.fsdp_version: 2 "
                             "(configs/accelerate/fsdp.yaml)")
    # DeepSpeed runs in one process too (ZeRO-Offload on one GPU): it needs the process group
    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 or zero.requested()) and not _initialized():
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


# --- FSDP (torch's fully_shard) --------------------------------------------------------------------


def fsdp_requested() -> bool:
    """The launcher asked for FSDP (accelerate's ACCELERATE_USE_FSDP) and there are processes to shard over."""
    return env_flag("ACCELERATE_USE_FSDP") and world_size() > 1


def fsdp_activation_checkpointing() -> bool:
    return fsdp_requested() and env_flag("FSDP_ACTIVATION_CHECKPOINTING")


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_sharded(model) -> bool:
    """Training state split over the processes: FSDP, or a DeepSpeed ZeRO engine (zero.py)."""
    from ilrdpo import zero

    return is_fsdp(model) or zero.engine_of(model) is not None


def shard(model, compute_dtype: torch.dtype) -> None:
    """fully_shard each decoder layer (the model's _no_split_modules, or accelerate's
    FSDP_TRANSFORMER_CLS_TO_WRAP), then the root, in place. Half compute dtypes all-gather the
    weights in that dtype and reduce gradients in float32 (the float32 master weights stay sharded);
    FSDP_RESHARD_AFTER_FORWARD=false keeps each layer gathered from forward to backward (ZeRO-2-like)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or ",".join(getattr(base, "_no_split_modules", None) or [])
    layer_classes = {n.strip() for n in names.split(",") if n.strip()}
    half = compute_dtype in (torch.bfloat16, torch.float16)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype if half else None,
                                  reduce_dtype=torch.float32 if half else None)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no")
    # FSDP_OFFLOAD_PARAMS: shards, gradients and optimizer steps on the CPU (slow; for models that fit no other way)
    offload = {"offload_policy": CPUOffloadPolicy()} if env_flag("FSDP_OFFLOAD_PARAMS") else {}
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        from ilrdpo.errors import UserInputError

        raise UserInputError(f"accelerate config: fsdp_transformer_layer_cls_to_wrap {sorted(layer_classes)} names "
                             f"no module of {type(base).__name__}")
    for layer in layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard, **offload)
    root_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                       cast_forward_inputs=False)  # masks and weights stay float32
    fully_shard(model, mp_policy=root_policy, reshard_after_forward=reshard, **offload)
    # log-probs call the decoder and the output head apart (logprobs._states_at): they run inside
    # one registered forward method of the root, so its weights are gathered and its gradients reduced
    model.run_sharded = types.MethodType(_call, model)
    register_fsdp_forward_method(model, "run_sharded")


def _call(_model, fn, *args, **kwargs):
    return fn(*args, **kwargs)


def full_state_dict(model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole (unsharded) weights of a sharded model, on the CPU of the main process ({} in the
    others; every process must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ilrdpo import zero

    if zero.engine_of(model) is not None:
        return zero.full_state_dict(model, trainable_only)

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # tied weights once, under their first name (as save_pretrained writes them)
    keep = {n for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    if not trainable_only:
        keep |= {n for n, _ in model.named_buffers()}
    return {n: v for n, v in state.items() if n in keep}


def full_optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from ilrdpo import zero

    if zero.engine_of(model) is not None:
        return zero.full_optimizer_state(model, optimizer)

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def load_full_state(model, optimizer, params: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Load whole weights and optimizer state (as full_state_dict / full_optimizer_state gave
    them) into a sharded model: each process keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from ilrdpo import zero

    if zero.engine_of(model) is not None:
        return zero.load_full_state(model, optimizer, params, optimizer_state)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, params, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective); the tensor itself otherwise."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def sharded_norm(params: list[torch.Tensor]) -> float:
    """The L2 norm of sharded params together: every process's shards (FSDP's DTensors, ZeRO-3's
    partitions), summed over processes; a weight every process holds whole counts once."""
    def part(p: torch.Tensor) -> torch.Tensor | None:
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.detach()
        if hasattr(p, "to_local"):
            return p.detach().to_local()
        return p.detach() if is_main() else None

    device = params[0].device if params else torch.device("cpu")
    with torch.no_grad():
        squares = sum((t.double().pow(2).sum() for t in map(part, params) if t is not None and t.numel()),
                      torch.zeros((), dtype=torch.float64, device=device))
        return float(all_sum(squares.reshape(1))[0]) ** 0.5

"""The parallel engines of the training stage, one object each, chosen once per process from what
the launcher asked for (ENGINES, launched()):

- plain: one process, whole weights;
- ddp: several processes, each with whole weights (replicas); every process runs its share of
  each micro-batch and the gradients are summed over processes before the identical optimizer
  step in each (ranks.all_sum: one all-reduce per dtype and device);
- fsdp: `accelerate launch --config_file configs/accelerate/fsdp.yaml` (torch's FSDP2
  `fully_shard`): weights, gradients and optimizer state sharded over the processes (each
  decoder layer one group, then the root); the trained weights are gathered once to save them;
- zero: DeepSpeed ZeRO (`configs/accelerate/deepspeed-zero{2,3}.yaml`, also in one process):
  ilrdpo.zero.

An engine owns what differs between them in a round: the forward (FSDP and ZeRO run it inside
their own bookkeeping), the backward, the gradient reduction, clipping and the optimizer step,
the weight norm of the divergence guard, the whole (gathered) weights and optimizer state of
checkpoints and of the saved model. Sharded engines (fsdp, zero) run every micro-batch in
lockstep (a process without pairs of its own runs a zero-weighted pass, since the others'
collectives wait for its own) and average gradients over processes, so each process weights its
share by the number of processes.

Sharding happens after the reference pass, which every process runs on whole weights; the
stages before and after training (sampling, scoring, evaluation) run on whole models, the one
after training loading the saved model. Checkpoints hold whole weights and optimizer state, so a
killed round resumes under any engine and any number of processes.
"""

from __future__ import annotations

import functools
import os
import types
from pathlib import Path

import torch
from accelerate import PartialState

from ilrdpo import ranks, zero
from ilrdpo.errors import UserInputError
from ilrdpo.models import resolve_dtype, save_model
from ilrdpo.progress import console

FLOAT16_REFUSED = ("config key 'model.dtype': float16 is not supported under FSDP or DeepSpeed (the loss scaler is "
                   "not shard-aware); use bfloat16")


def local_norm(params: list[torch.Tensor]) -> float:
    """The L2 norm of whole params together, accumulated in float32 without float32 copies of
    half-precision weights (the divergence guard takes it after every step)."""
    with torch.no_grad():
        norms = torch._foreach_norm([p.detach() for p in params], 2, dtype=torch.float32)
        return float(torch.linalg.vector_norm(torch.stack(norms)))


def sharded_norm(params: list[torch.Tensor]) -> float:
    """The L2 norm of sharded params together: every process's shards (FSDP's DTensors, ZeRO-3's
    partitions), summed over processes; a weight every process holds whole counts once."""
    def part(p: torch.Tensor) -> torch.Tensor | None:
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.detach()
        if hasattr(p, "to_local"):
            return p.detach().to_local()
        return p.detach() if ranks.is_main() else None

    device = params[0].device if params else torch.device("cpu")
    with torch.no_grad():
        squares = sum((t.double().pow(2).sum() for t in map(part, params) if t is not None and t.numel()),
                      torch.zeros((), dtype=torch.float64, device=device))
        return float(ranks.all_sum(squares.reshape(1))[0]) ** 0.5


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective); the tensor itself otherwise."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class Engine:
    """The plain engine (one process, whole weights), and the base of the others, which change
    only what differs from it."""

    name = "plain"
    # training state split over the processes: every process runs every micro-batch in lockstep,
    # gradients are averaged over processes, and the whole weights are gathered to save them
    sharded = False
    fused_optimizer = True  # torch's fused AdamW kernel, over whole local tensors (not shards or partitions)
    activation_checkpointing = False  # asked for by the launcher (FSDP's config), besides train.gradient_checkpointing

    def check_config(self, dtype: str, max_grad_norm: float) -> None:
        """Refuse, in one line, config settings this engine cannot honour (preflight)."""

    # --- a round ---------------------------------------------------------------------------------
    def prepare(self, model, gradient_checkpointing: bool, compute_dtype: torch.dtype) -> None:
        """Before the optimizer is built (after the reference pass: checkpointing is train-only)."""
        if gradient_checkpointing or self.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def attach(self, model, optimizer: torch.optim.Optimizer, max_grad_norm: float, compute_dtype) -> None:
        """After the optimizer is built; the schedule stays on `optimizer`."""

    def share(self, indices: list[int], n_in_step: int) -> tuple[list[int], float, float] | None:
        """This process's pairs of a micro-batch (position k to process k % W), their share of the
        step's pairs and the weight of their mean loss; None: no pass to run."""
        mine = indices[ranks.rank()::ranks.world_size()]
        share = len(mine) / n_in_step
        if not self.sharded:
            return (mine, share, share) if mine else None
        # averaged over processes: the shares already sum to 1 over them
        return mine or indices[:1], share, share * ranks.world_size()

    def forward(self, model, fn, *args):
        return fn(*args)

    def backward(self, losses: torch.Tensor, weight: float, scaler: torch.amp.GradScaler,
                 finite: bool | None = None) -> None:
        """The backward of a micro-batch's weighted mean loss. A non-finite loss stops the round
        before the step (DivergenceGuard.check_loss), so it never reaches the weights; replicas skip
        its backward, a sharded process still runs a zero-weighted one, since the others'
        collectives wait for its own. finite: whether every loss is finite, where the caller has
        it on the host already (one device sync fewer); None: checked here."""
        if finite is None:
            finite = bool(torch.isfinite(losses).all())
        if not finite and not self.sharded:
            return
        loss = losses.mean() * weight if finite else losses.nan_to_num(0.0, 0.0, 0.0).mean() * 0.0
        self._backward(loss, scaler)

    def _backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        scaler.scale(loss).backward()

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Make every process's gradients the step's (sharded engines reduce in their backward)."""

    def step(self, optimizer, scaler: torch.amp.GradScaler, params: list[torch.nn.Parameter],
             max_grad_norm: float) -> float:
        """Unscale (float16), clip, step, zero the gradients; the gradient norm before clipping."""
        scaler.unscale_(optimizer)
        grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def weight_norm(self, params: list[torch.nn.Parameter]) -> float:
        return local_norm(params)

    # --- whole state: checkpoints and the saved model (every process must call these) -------------
    def full_state_dict(self, model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The whole weights on the CPU of the main process (tied weights once, under their first
        name, as save_pretrained writes them)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # lazy: (a)

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        keep = {n for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
        if not trainable_only:
            keep |= {n for n, _ in model.named_buffers()}
        return {n: v for n, v in state.items() if n in keep}

    def full_optimizer_state(self, model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # lazy: (a)

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))

    def load_full_state(self, model, optimizer, params: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        """Whole weights and optimizer state (as full_state_dict / full_optimizer_state gave them);
        a sharded model keeps its own shards."""
        from torch.distributed.checkpoint.state_dict import (  # lazy: (a)
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, params, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

    def save(self, model, tokenizer, out_dir: str | Path, card: dict, merge_lora: bool = False,
             dtype: torch.dtype | None = None) -> Path:
        """models.save_model by the main process (replicas are identical; sharded weights are
        gathered to it first, which every process joins); dtype: see save_model."""
        state = self.full_state_dict(model) if self.sharded else None
        if ranks.is_main():
            save_model(model, tokenizer, out_dir, card, merge_lora=merge_lora, state_dict=state, dtype=dtype)
        return Path(out_dir)

    def release(self, model) -> bool:
        """The round is saved: free the engine's hold on `model`. True if the model in memory is
        still whole (the next stage may use it), False if it must be loaded from disk."""
        return not self.sharded


# (a) lazy: torch.distributed's checkpoint and FSDP modules take seconds to import (3 s measured on
#     a 2-core CPU), and only checkpoints, sharded saves and FSDP need them, not every command.


class DataParallel(Engine):
    """Replicas in several processes: gradients summed over processes before each step."""

    name = "ddp"

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over processes, flattened into one buffer per dtype and device."""
        groups: dict[tuple, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # a process without pairs in this step contributes zeros
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for members in groups.values():
            flat = torch.cat([p.grad.reshape(-1) for p in members])
            ranks.all_sum(flat)
            offset = 0
            for p in members:
                p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
                offset += p.grad.numel()


class FSDP(Engine):
    """torch's FSDP2 (fully_shard) over the processes."""

    name = "fsdp"
    sharded = True
    fused_optimizer = False

    def __init__(self) -> None:
        self.activation_checkpointing = ranks.env_flag("FSDP_ACTIVATION_CHECKPOINTING")

    def check_config(self, dtype: str, max_grad_norm: float) -> None:
        if dtype == "float16":
            raise UserInputError(FLOAT16_REFUSED)

    def prepare(self, model, gradient_checkpointing: bool, compute_dtype: torch.dtype) -> None:
        """fully_shard each decoder layer (the model's _no_split_modules, or accelerate's
        FSDP_TRANSFORMER_CLS_TO_WRAP), then the root, in place. Half compute dtypes all-gather the
        weights in that dtype and reduce gradients in float32 (the float32 master weights stay
        sharded); FSDP_RESHARD_AFTER_FORWARD=false keeps each layer gathered from forward to
        backward (ZeRO-2-like)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard  # lazy: (a)

        super().prepare(model, gradient_checkpointing, compute_dtype)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or ",".join(getattr(base, "_no_split_modules", None) or [])
        layer_classes = {n.strip() for n in names.split(",") if n.strip()}
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise UserInputError(f"accelerate config: fsdp_transformer_layer_cls_to_wrap {sorted(layer_classes)} "
                                 f"names no module of {type(base).__name__}")
        half = compute_dtype in (torch.bfloat16, torch.float16)
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype if half else None,
                                      reduce_dtype=torch.float32 if half else None)
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no")
        # FSDP_OFFLOAD_PARAMS: shards, gradients and optimizer steps on the CPU (slow; for models that fit no other way)
        offload = {"offload_policy": CPUOffloadPolicy()} if ranks.env_flag("FSDP_OFFLOAD_PARAMS") else {}
        for layer in layers:
            fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard, **offload)
        root_policy = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                           cast_forward_inputs=False)  # masks and weights stay float32
        fully_shard(model, mp_policy=root_policy, reshard_after_forward=reshard, **offload)
        self._register_forward(model)

    @staticmethod
    def _register_forward(model) -> None:
        # log-probs call the decoder and the output head apart (logprobs._states_at): they run inside
        # one registered forward method of the root, so its weights are gathered and its gradients reduced
        from torch.distributed.fsdp import register_fsdp_forward_method  # lazy: (a)

        model.run_sharded = types.MethodType(_call, model)
        register_fsdp_forward_method(model, "run_sharded")

    def forward(self, model, fn, *args):
        return model.run_sharded(fn, *args)

    def weight_norm(self, params: list[torch.nn.Parameter]) -> float:
        return sharded_norm(params)


def _call(_model, fn, *args, **kwargs):
    return fn(*args, **kwargs)


class ZeRO(Engine):
    """A DeepSpeed ZeRO engine (ilrdpo.zero) owns the model and its AdamW for the round."""

    name = "zero"
    sharded = True
    fused_optimizer = False

    def __init__(self) -> None:
        self.engine = None  # deepspeed's, from attach() to release()

    def check_config(self, dtype: str, max_grad_norm: float) -> None:
        if dtype == "float16":
            raise UserInputError(FLOAT16_REFUSED)
        # the launcher's settings against the config's, before anything runs
        zero.engine_config(max_grad_norm, resolve_dtype(dtype))

    def attach(self, model, optimizer, max_grad_norm: float, compute_dtype) -> None:
        # DeepSpeed takes the model and its AdamW after the reference pass, like FSDP
        self.engine = zero.initialize(model, optimizer, max_grad_norm, compute_dtype)

    def forward(self, model, fn, *args):
        # through the engine's forward, which opens its backward bookkeeping
        return zero.forward(self.engine, fn, *args)

    def _backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        zero.backward(self.engine, loss)

    def step(self, optimizer, scaler, params, max_grad_norm: float) -> float:
        return zero.step(self.engine)  # it clips, steps and zeroes the gradients

    def weight_norm(self, params: list[torch.nn.Parameter]) -> float:
        return sharded_norm(params)

    def full_state_dict(self, model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        return zero.full_state_dict(model, trainable_only)

    def full_optimizer_state(self, model, optimizer) -> dict:
        return zero.full_optimizer_state(model, optimizer)

    def load_full_state(self, model, optimizer, params: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        zero.load_full_state(model, optimizer, params, optimizer_state)

    def release(self, model) -> bool:
        zero.release(model)
        self.engine = None
        return False


ENGINES: dict[str, type[Engine]] = {"plain": Engine, "ddp": DataParallel, "fsdp": FSDP, "zero": ZeRO}


def launched_name() -> str:
    """The engine the launcher asked for: DeepSpeed (with any number of processes: one is
    ZeRO-Offload's CPU memory on a single GPU), FSDP (accelerate's ACCELERATE_USE_FSDP) over
    several processes, else replicas."""
    if zero.requested():
        return "zero"
    if ranks.world_size() == 1:
        return "plain"
    return "fsdp" if ranks.env_flag("ACCELERATE_USE_FSDP") else "ddp"


def launched() -> Engine:
    """This process's engine (one object per engine and process: ZeRO's holds its round's engine)."""
    return _engine(launched_name())


@functools.cache
def _engine(name: str) -> Engine:
    return ENGINES[name]()


def check_launch() -> None:
    """Refuse, in one line, launcher settings no engine can run, before any stage starts."""
    zero.check_launch()
    if ranks.env_flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "2") != "2":
        raise UserInputError("accelerate config: fsdp_version 1 is not supported; set fsdp_config.fsdp_version: 2 "
                             "(configs/accelerate/fsdp.yaml)")


def init() -> None:
    """Join the process group that `accelerate launch` / torchrun describe in the environment
    (accelerate's PartialState: NCCL on GPUs, gloo on CPUs); a single process joins none."""
    check_launch()
    # DeepSpeed runs in one process too (ZeRO-Offload on one GPU): it needs the process group
    if (int(os.environ.get("WORLD_SIZE", "1")) > 1 or zero.requested()) and not ranks.initialized():
        PartialState()
        if not ranks.is_main():  # one voice: the main process prints and draws the progress bars
            console.quiet = True
            os.environ["ILRDPO_QUIET"] = "1"

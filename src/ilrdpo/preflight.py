"""Checks that run before any model is loaded or any file is written.

Everything that can be known from the config and the input files alone is checked here, so a
bad input costs seconds, not a model load or a sampling pass, and never touches a run directory.
Each failure is one UserInputError line naming the file and line, or the config key.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

from ilrdpo.config import Config, ModelSettings, ScoringSettings, load_config
from ilrdpo.errors import UserInputError
from ilrdpo.files import read_json_file
from ilrdpo.hub import BUNDLED, go_offline, hub_reachable
from ilrdpo.records import read_pairs, read_prompts

Command = Literal["run", "train"]

# config.json keys that hold a model's context length, by model family.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
# Python packages each train.report_to tracker needs (any one of them).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_config(config: Config, command: Command, scorer_given: bool = False) -> None:
    """Settings and input files a command needs; raises UserInputError naming the key or FILE:LINE.
    scorer_given: the Python API passed the scorer as a callable, so the scoring section names none."""
    if command == "train" and not config.data.pairs:
        raise UserInputError("data.pairs is required for `ilrdpo train` (a JSONL file or a dataset)")
    if command == "train" and config.loss.target_length == "base":
        raise UserInputError("config key 'loss.target_length': 'base' needs the initial model's samples, which only "
                             "`ilrdpo run` has; give a number, or per-pair target_length fields")
    if command == "run":
        if not config.data.prompts:
            raise UserInputError("data.prompts is required for `ilrdpo run`")
        check_sampling(config)
        check_server(config)
    from ilrdpo import engines  # torch: not for the model checks of `generate` and `chat`

    engines.launched().check_config(config.model.dtype, config.train.max_grad_norm)
    check_output_dir(Path(config.output_dir), command)
    if config.model.push_to_hub and not HUB_REPO.fullmatch(config.model.push_to_hub):
        raise UserInputError(f"config key 'model.push_to_hub': '{config.model.push_to_hub}' is not a hub repository "
                             "id; use org/name")
    check_trackers(config.train.report_to)
    model_config = check_model(config.model)
    if model_config is not None:
        check_context(config, model_config, command)
    if command == "train":
        check_pairs_file(config)
    else:
        check_prompt_files(config)
        if not scorer_given:
            check_scorer(config.scoring, "scoring")
        if config.eval.judge is not None:
            check_scorer(config.judge_scorer(), "eval.judge")


# --- generation and pairing ----------------------------------------------------------------------


def check_server(config: Config) -> None:
    """backend server: the weights each round samples from must be the ones it trained."""
    gen, model = config.generation, config.model
    if gen.backend != "server":
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserInputError("config key 'generation.backend': server runs `ilrdpo run` in one process; launch it "
                             "without accelerate/torchrun (the server takes the sampling GPUs)")
    if gen.server.url is not None and model.lora is None and config.iterations.count > 1:
        raise UserInputError("config key 'generation.server.url': a server you run keeps its weights, so rounds "
                             "after the first would not sample from the model they train; use "
                             "generation.server.command (started per round on its model) or model.lora (each "
                             "round's adapter loaded into the server)")
    if gen.server.command is not None and model.lora is not None and not model.merge_lora:
        raise UserInputError("config key 'generation.server.command': with model.lora the server loads each round's "
                             "merged weights; set model.merge_lora: true")


def check_sampling(config: Config) -> None:
    """Pairing needs at least two different answers per prompt."""
    gen = config.generation
    if gen.num_samples < 2:
        raise UserInputError(f"config key 'generation.num_samples': {gen.num_samples} answer per prompt cannot "
                             "make a (chosen, rejected) pair; set it to 2 or more")
    if gen.temperature == 0:
        raise UserInputError(f"config key 'generation.temperature': 0 is greedy decoding, so all "
                             f"{gen.num_samples} answers to a prompt are the same and no pair can be made; "
                             "set it above 0 (e.g. 0.8)")


# --- output folder and trackers ------------------------------------------------------------------


def check_output_dir(out: Path, command: Command) -> None:
    """output_dir is a folder (or can be made one) that this process may write."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"config key 'output_dir': '{out}' is a file, not a folder; choose another output_dir")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"config key 'output_dir': '{existing}' is a file, so '{out}' cannot be created "
                             "below it; choose another output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"config key 'output_dir': '{existing}' is not writable; choose another output_dir")
    if command == "run" and out.is_dir():
        check_run_files(out)


def check_run_files(out: Path) -> None:
    """A run directory being resumed: its state.json and config.yaml must be readable."""
    if (out / "config.yaml").is_file():
        load_config(out / "config.yaml")
    state_path = out / "state.json"
    if not state_path.exists():
        return
    state = read_json_file(state_path)
    bad = f"{state_path}: not an ilrdpo run state"
    if not isinstance(state, dict):
        raise UserInputError(f"{bad} (expected an object); restore it or use a new output_dir")
    for key in ("finished", "started", "alpha"):
        value = state.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.isdigit() for k in value):
            raise UserInputError(f"{bad} ('{key}' must map iteration numbers); restore it or use a new output_dir")
        for item in value.values():
            ok = isinstance(item, (int, float)) and not isinstance(item, bool) if key == "alpha" else \
                isinstance(item, list) and all(isinstance(stage, str) for stage in item)
            if not ok:
                raise UserInputError(f"{bad} (a bad '{key}' entry); restore it or use a new output_dir")


def check_trackers(report_to: list[str]) -> None:
    for tracker in report_to:
        packages = TRACKER_PACKAGES.get(tracker, (tracker,))
        if not any(importlib.util.find_spec(name) is not None for name in packages):
            raise UserInputError(f"config key 'train.report_to': '{tracker}' needs the {packages[0]} package; "
                                 f"pip install {packages[0]}, or remove it from train.report_to")


# --- models --------------------------------------------------------------------------------------


def local_model_folder(name: str, key: str) -> Path | None:
    """The folder a model setting names, or None for a hub id (and bundled models); a path that
    is not there is an error here instead of transformers' "Repo id must be in the form"."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            hint = " (for a .gguf file set model.gguf_file and name its folder)" if path.suffix == ".gguf" else ""
            raise UserInputError(f"config key '{key}': '{name}' is a file, expected a model folder or a hub id{hint}")
        return path
    if not HUB_ID.fullmatch(name) or ".." in name:
        raise UserInputError(f"config key '{key}': folder '{name}' not found (a hub id has the form org/name)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
    if offline or not hub_reachable():
        if not _in_hub_cache(name):
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
            raise UserInputError(f"config key '{key}': model '{name}' is not a folder here nor in the local hub "
                                 f"cache, and {why}; give a local model folder (save_pretrained output) or a "
                                 f"bundled model ({', '.join('bundled:' + b for b in BUNDLED)})")
        go_offline()  # the cached copy, without a minute of retries first
    return None


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # HFValidationError: a name the hub library rejects is not in its cache
        return False


def check_hub_models(settings: dict[str, Any]) -> None:
    """The hub models named in a config's settings (config.merged_settings, before validation, which
    loads torch) are cached or the hub is reachable: an offline machine hears it in seconds."""
    def value(*keys: str) -> Any:
        node: Any = settings
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    names = [("model.name_or_path", value("model", "name_or_path"))] + \
        [(".".join(keys) + ".model", value(*keys, "model")) for keys in (("scoring",), ("eval", "judge"))
         if value(*keys, "type") not in ("python", "llm")]  # llm: a served name, no model here
    for key, name in names:
        if isinstance(name, str) and name and not name.startswith("bundled:") and not Path(name).expanduser().exists():
            local_model_folder(name, key)


def check_model(model: ModelSettings) -> dict[str, Any] | None:
    """The policy's config.json (None for a hub id or a GGUF file); the checkpoint is sound and
    safe, and custom code is only used with model.trust_remote_code."""
    if model.name_or_path.startswith("bundled:"):
        from ilrdpo.models import bundled_path

        bundled_path(model.name_or_path.removeprefix("bundled:"))  # its package is installed
        return None
    folder = local_model_folder(model.name_or_path, "model.name_or_path")
    if folder is None:
        return None
    if model.gguf_file:
        if not (folder / model.gguf_file).is_file():
            raise UserInputError(f"config key 'model.gguf_file': '{folder / model.gguf_file}' not found")
        return None
    if (folder / "adapter_config.json").is_file():
        return None  # a LoRA adapter: its base model is named inside and checked when loaded
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"config key 'model.name_or_path': '{folder}' has no config.json; "
                             "is it a Hugging Face model folder?")
    config = read_json_file(config_path)
    if not isinstance(config, dict):
        raise UserInputError(f"{config_path}: expected a JSON object")
    check_model_code(config, config_path, model.trust_remote_code)
    from ilrdpo.models import check_checkpoint

    check_checkpoint(folder)
    return {**config, "_path": str(config_path)}


def check_model_code(config: dict[str, Any], config_path: Path, trust_remote_code: bool) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING_NAMES or trust_remote_code:
        return
    if "auto_map" in config:
        raise UserInputError(f"{config_path}: model_type '{model_type}' runs Python code shipped with the model "
                             "(auto_map); set model.trust_remote_code: true if you trust its source")
    raise UserInputError(f"{config_path}: model_type '{model_type}' is not known to this transformers version")


def model_context(config: dict[str, Any]) -> tuple[int, str] | None:
    """(positions, config.json key) of a model's context, when its config states one."""
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_context(config: Config, model_config: dict[str, Any], command: Command) -> None:
    """Lengths that must fit the context (read from config.json, before any weights): learned
    position embeddings index past their table, RoPE models run on untrained positions."""
    found = model_context(model_config)
    if found is None:
        return
    context, key = found
    where = f"the model's context of {context} positions ({key} in {model_config['_path']})"
    if config.train.max_length > context:
        raise UserInputError(f"config key 'train.max_length': {config.train.max_length} is beyond {where}; "
                             f"set train.max_length <= {context}")
    if command == "run" and config.generation.max_new_tokens >= context:
        raise UserInputError(f"config key 'generation.max_new_tokens': {config.generation.max_new_tokens} leaves no "
                             f"room for the prompt in {where}; set it below {context}")


# --- input files ---------------------------------------------------------------------------------


def check_pairs_file(config: Config) -> None:
    """A JSONL pairs file is read in full here (other sources are read by `datasets` later)."""
    path = Path(config.data.pairs)
    if path.suffix == ".jsonl":
        read_pairs(path, uniform_target=True)


def _needs_reference(settings: ScoringSettings, key: str) -> str | None:
    needs = settings.type == "embedding_similarity"
    return f"{key}.type embedding_similarity" if needs else None


def check_prompt_files(config: Config) -> None:
    """Training and eval prompts: readable, and with what the scorer and the judge need."""
    read_prompts(config.data.prompts, uniform_target=True,
                 reference_for=_needs_reference(config.scoring, "scoring"))
    if config.data.eval_prompts:
        judge, key = config.judge_scorer(), ("eval.judge" if config.eval.judge else "scoring")
        read_prompts(config.data.eval_prompts, reference_for=_needs_reference(judge, key))


def check_scorer(settings: ScoringSettings, key: str) -> None:
    """What a scorer needs that can be checked without loading it."""
    if settings.type == "reward_model":
        if not settings.model:
            raise UserInputError(f"config key '{key}.model' is required for {key}.type reward_model")
        folder = local_model_folder(settings.model, f"{key}.model")
        if folder is not None:
            from ilrdpo.models import check_checkpoint

            check_checkpoint(folder)
    elif settings.type in ("embedding_similarity", "prompt_similarity"):
        if settings.model and not settings.model.startswith("bundled:"):
            local_model_folder(settings.model, f"{key}.model")
    elif settings.type in ("remote", "llm"):
        if settings.type == "llm" and key != "eval.judge":
            raise UserInputError(f"config key '{key}.type': llm judges pairs of answers; it is an eval.judge only "
                                 "(training needs a score per answer)")
        if not settings.url:
            raise UserInputError(f"config key '{key}.url' is required for {key}.type {settings.type}")
    elif settings.type == "python":
        if not settings.function:
            raise UserInputError(f"config key '{key}.function' is required for {key}.type python")
        from ilrdpo.scoring.python_fn import check_function_file

        check_function_file(settings.function, f"{key}.function")


def check_model_option(name: str, option: str) -> None:
    """A model given on the command line (`--model`): a sound folder, a bundled model, or a hub
    id that can be loaded (cached, or the hub reachable)."""
    if name.startswith("bundled:"):
        from ilrdpo.models import bundled_path

        bundled_path(name.removeprefix("bundled:"))
        return
    try:
        folder = local_model_folder(name, option)
    except UserInputError as error:
        raise UserInputError(str(error).replace(f"config key '{option}'", f"option '{option}'")) from None
    if folder is not None and (folder / "config.json").is_file():
        from ilrdpo.models import check_checkpoint

        check_checkpoint(folder)


def check_evaluate(model: str, prompts: str, judge: ScoringSettings, baseline: str | None, out: str | None) -> None:
    """`ilrdpo evaluate`: models, prompts, judge and the result path, before any model loads."""
    for key, name in (("--model", model), ("--baseline", baseline)):
        if name is not None:
            check_model_option(name, key)
    read_prompts(prompts, reference_for=_needs_reference(judge, "judge"))
    check_scorer(judge, "judge")
    if out is not None:
        out_path = Path(out)
        if out_path.is_dir():
            raise UserInputError(f"option '--out': '{out}' is a folder; give a file name such as {out_path / 'eval.json'}")
        check_output_dir(out_path.parent if str(out_path.parent) else Path("."), "train")

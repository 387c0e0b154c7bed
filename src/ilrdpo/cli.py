"""Command line: thin commands over the library functions.

Importing this module loads no torch and no transformers (`--help` answers at once): each command
imports what it needs when it runs; ilrdpo.config is torch-free for the defaults shown here.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import typer

from ilrdpo import __version__, interrupts
from ilrdpo.cli_args import split_config, usage_line
from ilrdpo.config import (
    DataSettings,
    GenerationSettings,
    field_docs,
    load_config,
    merged_settings,
    migrate_config_file,
    read_config_file,
)
from ilrdpo.errors import IlrdpoError, UserInputError
from ilrdpo.files import atomic_write_text
from ilrdpo.progress import console

# rich_markup_mode=None: click's plain help, which reads the same in a pipe at 80 columns and shows
# no `<bool>` placeholder after a flag (typer's boxed help does)
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Iterative Length-Regularized DPO: better answers without longer answers.")

def _print_version(value: bool) -> None:
    if value:
        print(f"ilrdpo {__version__}")
        raise typer.Exit()


def flag(name: str, help: str) -> bool:
    """An on/off option, off unless given."""
    return typer.Option(False, name, help=help)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Iterative Length-Regularized DPO: better answers without longer answers."""


def _join_processes() -> None:
    """Under accelerate launch / torchrun: join the processes (one process: nothing). Called by the
    commands that work, not for `--help`, which must not wait for torch."""
    from ilrdpo import engines

    engines.init()


# `ilrdpo evaluate`'s defaults are the config's generation defaults: one source of truth.
GENERATION = GenerationSettings()
OVERRIDES = typer.Argument(None, help="section.key=value overrides, e.g. loss.alpha=0.05", show_default=False)
CONFIG_OPTION = typer.Option(None, "--config", metavar="FILE", help="YAML config (the same as giving it first)")
OVERRIDE_HELP = ("Any config key can be set as section.key=value or --section.key value, and TRL's DPOConfig names "
                 "are accepted (--learning_rate 5e-7, --beta 0.1, --push-to-hub org/name, ...); every key: "
                 "`ilrdpo config-help`.")


CONFIG_ARGS = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}


@app.command(**CONFIG_ARGS, epilog=OVERRIDE_HELP)
def train(config: str | None = typer.Argument(None, help="YAML config (omit for defaults)", show_default=False),
          overrides: list[str] | None = OVERRIDES,
          config_file: str | None = CONFIG_OPTION,
          overwrite: bool = flag("--overwrite", "Replace a trained model in output_dir")) -> None:
    """One round of LR-DPO on preference pairs.

    Required: data.pairs (a JSONL file, a dataset folder or file, or a hub dataset name). The model
    (default the bundled SmolLM2-135M-Instruct) goes to output_dir/model; a stopped round resumes.
    """
    config, overrides = split_config(config, overrides, config_file)
    settings = _load_config(config, overrides)
    from ilrdpo.offline import run_offline

    _join_processes()
    run_offline(settings, overwrite=overwrite)


@app.command(**CONFIG_ARGS, epilog=OVERRIDE_HELP)
def run(config: str | None = typer.Argument(None, help="YAML config", show_default=False),
        overrides: list[str] | None = OVERRIDES,
        config_file: str | None = CONFIG_OPTION,
        force: bool = flag("--force", "Continue even if the config changed under finished work"),
        redo: str | None = typer.Option(None, "--redo", metavar="ITER:STAGE", show_default=False,
                                        help="Compute again from this stage of this iteration (e.g. 1:generate; "
                                        "0:eval = the initial model's evaluation), and everything after it, with "
                                        "the config given; the replaced files move to OUT/replaced/NNN/")) -> None:
    """The iterative loop: sample, score, pair, train, evaluate; resumes an existing run directory.

    Required: data.prompts (JSONL; the default scorer, embedding similarity, also needs a reference answer
    per prompt). data.eval_prompts adds win rates per iteration. Output: output_dir (default runs/default).
    """
    from ilrdpo.resume import parse_redo

    point = parse_redo(redo) if redo is not None else None
    config, overrides = split_config(config, overrides, config_file)
    settings = _load_config(config, overrides)
    from ilrdpo.loop import run_iterations

    _join_processes()
    run_iterations(settings, force=force, redo=point)


@app.command()
def evaluate(
    model: str = typer.Option(..., "--model", help="Model folder, hub id, LoRA adapter folder or bundled:NAME"),
    prompts: str = typer.Option(..., "--prompts", help="Eval prompts JSONL (reference / target_length optional)"),
    judge: str | None = typer.Option(None, "--judge", help="YAML with scoring-section keys"),
    baseline: str | None = typer.Option(None, "--baseline", help="Baseline model to compare against"),
    out: str | None = typer.Option(None, "--out", help="Write the result JSON here (answers beside it)"),
    max_new_tokens: int = typer.Option(GENERATION.max_new_tokens, help="Longest answer in tokens"),
    sample: bool = flag("--sample", "Sample (seeded) instead of greedy decoding"),
    temperature: float = typer.Option(GENERATION.temperature, help="Sampling temperature with --sample"),
    seed: int = typer.Option(0, help="Seed for --sample"),
    batch_size: int = typer.Option(GENERATION.batch_size, help="Sequences decoded together"),
    anchors: bool = flag("--anchors", "Also answer with the baseline told to be concise and verbose (two more "
                         "passes): length anchors for the LC fit"),
) -> None:
    """Win rate and length-controlled win rate of a model against a baseline under a judge."""
    from ilrdpo import ranks
    from ilrdpo.preflight import check_evaluate, check_model_option

    for option, name in (("--model", model), ("--baseline", baseline)):
        if name is not None:  # first: before torch loads, an unreachable hub is said in seconds
            check_model_option(name, option)
    from ilrdpo.evaluate import evaluate_models, load_judge_settings, print_evaluation

    _join_processes()
    judge_settings = load_judge_settings(judge)
    check_evaluate(model, prompts, judge_settings, baseline, out)
    generation = _generation(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    out_path = Path(out) if out else None
    result = evaluate_models(model, prompts, judge_settings, baseline=baseline, generation=generation,
                             greedy=not sample, seed=seed, out_dir=out_path.parent if out_path else None,
                             anchors=anchors)
    print_evaluation(result)
    if out_path and ranks.is_main():
        atomic_write_text(out_path, json.dumps(result, indent=1))


# Options of `generate` and `chat`: one declaration, one meaning in both.
MODEL = typer.Option(..., "--model", help="Model folder (`ilrdpo run`/`train` output, full or LoRA), hub id or "
                     "bundled:NAME")
SCORER = typer.Option(None, "--scorer", help="YAML with scoring-section keys (for --best-of)")
TARGET_LENGTH = typer.Option(None, "--target-length", help="Prefer answers near this length")
LENGTH_UNIT = typer.Option("tokens", "--length-unit", help="tokens or chars")
LENGTH_WEIGHT = typer.Option(0.01, "--length-weight", help="Score lost per unit of |length - target|")
SYSTEM = typer.Option(None, "--system", help="System message before each prompt")
MAX_NEW_TOKENS = typer.Option(GENERATION.max_new_tokens, "--max-new-tokens", help="Longest answer in tokens")
TEMPERATURE = typer.Option(GENERATION.temperature, "--temperature", help="Sampling temperature")
TOP_P = typer.Option(GENERATION.top_p, "--top-p", help="Nucleus sampling mass")
SEED = typer.Option(0, "--seed", help="Sampling seed")
NUM_SAMPLES = 4


@app.command()
def generate(
    model: str = MODEL,
    prompts: str = typer.Option(..., "--prompts", help="Prompts JSONL (strings or message lists; target_length optional)"),
    out: str = typer.Option(..., "--out", help="Output JSONL: prompt, response, candidates"),
    num_samples: int = typer.Option(NUM_SAMPLES, "--num-samples", min=1, help="Answers per prompt (without --best-of)"),
    best_of: int | None = typer.Option(None, "--best-of", min=1, metavar="N",
                                       help="Sample N answers per prompt and keep the best (needs --scorer)"),
    scorer: str | None = SCORER,
    target_length: float | None = TARGET_LENGTH,
    length_unit: str = LENGTH_UNIT,
    length_weight: float = LENGTH_WEIGHT,
    system_prompt: str | None = SYSTEM,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
) -> None:
    """N answers per prompt from a trained model; --best-of N keeps the best under a scorer and a target length."""
    from ilrdpo.preflight import check_model_option

    check_model_option(model, "--model")  # first: before torch loads, an unreachable hub is said in seconds
    from ilrdpo.best_of import generate_file
    from ilrdpo.evaluate import load_judge_settings

    _join_processes()
    if best_of is not None and num_samples not in (NUM_SAMPLES, best_of):
        raise UserInputError(f"options '--num-samples' {num_samples} and '--best-of' {best_of}: --best-of N samples "
                             "N answers; give one of them")
    generate_file(model, prompts, out, num_samples=best_of or num_samples, best_of=best_of is not None, seed=seed,
                  generation=_generation(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p),
                  data=DataSettings(system_prompt=system_prompt),
                  scorer=load_judge_settings(scorer) if scorer else None,
                  rerank=_rerank(target_length, length_unit, length_weight))


def _generation(**values: float) -> GenerationSettings:
    """The generation settings of command-line options; a bad value is one line naming its option."""
    try:
        return GenerationSettings(**values)
    except ValueError as error:  # pydantic's ValidationError
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-")
        raise UserInputError(f"option '{option}': {first['msg'].lower()}") from None


def _rerank(target_length: float | None, length_unit: str, length_weight: float):
    from ilrdpo.best_of import Rerank

    if length_unit not in ("tokens", "chars"):
        raise UserInputError(f"option '--length-unit': '{length_unit}' is not tokens or chars")
    return Rerank(target_length, length_unit, length_weight)


@app.command()
def chat(
    model: str = MODEL,
    best_of: int = typer.Option(1, "--best-of", min=1, metavar="N",
                                help="Sample N replies per turn and keep the best (needs --scorer when N > 1)"),
    scorer: str | None = SCORER,
    target_length: float | None = TARGET_LENGTH,
    length_unit: str = LENGTH_UNIT,
    length_weight: float = LENGTH_WEIGHT,
    system_prompt: str | None = SYSTEM,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
    verbose: bool = flag("--verbose", "Show every candidate with its score"),
) -> None:
    """Chat with a model in the terminal (/reset, /save FILE, /quit); input may be piped in."""
    from ilrdpo.preflight import check_model_option

    check_model_option(model, "--model")  # first: before torch loads, an unreachable hub is said in seconds
    from ilrdpo.chat import run_chat
    from ilrdpo.evaluate import load_judge_settings

    _join_processes()
    run_chat(model, best_of=best_of, scorer=load_judge_settings(scorer) if scorer else None,
             rerank=_rerank(target_length, length_unit, length_weight), system_prompt=system_prompt,
             verbose=verbose, seed=seed,
             generation=_generation(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p))


@app.command(**CONFIG_ARGS, epilog=OVERRIDE_HELP)
def tune(config: str | None = typer.Argument(None, help="YAML config with a tune section", show_default=False),
         overrides: list[str] | None = OVERRIDES,
         config_file: str | None = CONFIG_OPTION,
         trials: int = typer.Option(10, "--trials", min=1, help="Trials to run in this invocation"),
         storage: str | None = typer.Option(None, "--storage", help="optuna storage URL (default OUT/study.db)"),
         study: str | None = typer.Option(None, "--study", help="Study name (default the output folder's name)"),
         resume: bool = flag("--resume", "Add trials to an existing study")) -> None:
    """Hyperparameter search (optuna): each trial a short `ilrdpo run`; best config, Pareto set and plots."""
    config, overrides = split_config(config, overrides, config_file)
    settings = _load_config(config, overrides)
    from ilrdpo.tuning import tune as run_tune

    _join_processes()
    with interrupts.where(resume="rerun it with --resume to add the remaining trials to the study"):
        run_tune(settings, trials=trials, storage=storage, study_name=study, resume=resume)


# the README says the same (Quick start)
QUICK_DEMO = "8 prompts, 2 iterations, 10 eval prompts (minutes on a laptop CPU; too small to show the effect)"


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Folder for both arms and the report"),
    quick: bool = flag("--quick", f"The smoke version: {QUICK_DEMO}"),
    model: str | None = typer.Option(None, "--model", help="Base policy (default: bundled SmolLM2-135M-Instruct)"),
    seed: int = typer.Option(0, help="Seed for both arms"),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2: the demo once "
                                     "per seed (OUT/seed_S) and a table of mean and spread (OUT/study.md)"),
    tune: bool = flag("--tune", "Instead: search alpha for the demo's setup (one iteration per trial; quality LC "
                      "win rate up, length down: a Pareto set in OUT)"),
    trials: int = typer.Option(6, "--trials", min=1, help="With --tune: trials to run"),
    resume: bool = flag("--resume", "With --tune: add trials to OUT's study"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Vanilla iterative DPO vs iLR-DPO offline: quality up, length not."""
    from ilrdpo.demo import run_demo, run_study, run_tune

    _join_processes()
    if tune:
        run_tune(out, trials=trials, resume=resume, quick=quick, model=model, seed=seed, overrides=list(overrides or []))
        return
    if seeds is None:
        with interrupts.where("the demo"):  # its runs resume
            run_demo(out, quick=quick, model=model, seed=seed, overrides=list(overrides or []))
        return
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    with interrupts.where("the demo"):
        run_study(out, seed_list, quick=quick, model=model, overrides=list(overrides or []))


@app.command()
def report(run_dirs: list[str] = typer.Argument(..., help="Run directories of `ilrdpo run`"),
           out: str = typer.Option("report", "--out", help="Folder for report.md and plots/"),
           names: str | None = typer.Option(None, "--names", help="Comma-separated run names")) -> None:
    """report.md and plots for one or several runs side by side; tables in the terminal."""
    from ilrdpo.evaluation.report import print_tables, write_report
    from ilrdpo.evaluation.rundata import load_runs

    name_list = names.split(",") if names else None
    path = write_report([Path(d) for d in run_dirs], Path(out), names=name_list)
    print_tables(load_runs([Path(d) for d in run_dirs], name_list))
    console.print(f"report: {path}")


@app.command("config-help")
def config_help() -> None:
    """Every config key with its default and meaning."""
    width = min(shutil.get_terminal_size((80, 24)).columns, 100) if sys.stdout.isatty() else 80
    print("\n\n".join(config_key_block(key, default, doc, width) for key, default, doc in field_docs()))


@app.command("config-migrate")
def config_migrate(path: str = typer.Argument(..., help="A config file written for an earlier version"),
                   out: str | None = typer.Option(None, "--out", help="Write today's config here (default: print it)"),
                   ) -> None:
    """A config whose keys were removed since, in today's keys: moved and renamed keys in their new
    place, keys that changed nothing dropped, and each dropped key that changed what a run computes
    named with what to use instead. YAML comments are not kept."""
    text, notes = migrate_config_file(path)
    for note in notes:
        console.print(note, highlight=False, markup=False, soft_wrap=True)  # one line each
    if out is None:
        print(text, end="")
        return
    atomic_write_text(Path(out), text)
    console.print(f"wrote {out}" + (f" ({len(notes)} key(s) above dropped)" if notes else ""), highlight=False,
                  soft_wrap=True)


def config_key_block(key: str, default: str, doc: str, width: int = 80) -> str:
    """One key of `config-help`: `key = default` whole on its first line, the meaning wrapped
    below it (a table at 80 columns cut key names and defaults to '…')."""
    head = f"{key} = {default}" if default else key
    return "\n".join([head, *textwrap.wrap(doc, width, initial_indent="    ", subsequent_indent="    ")])


def _load_config(path: str | None, overrides: list[str]):
    """The config, after a check of the hub models it names, before validation (which can load
    torch with the pydantic models' validators), so an offline machine hears about a model it
    cannot get in seconds."""
    from ilrdpo.preflight import check_hub_models

    check_hub_models(merged_settings(read_config_file(path), overrides, "command line" if path is None else str(path)))
    return load_config(path, overrides)


def main() -> None:
    try:
        with interrupts.handled():
            status = app(standalone_mode=False, prog_name="ilrdpo")
    except interrupts.Interrupted as stop:
        interrupts.exit_for(stop)
    except IlrdpoError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as error:
        # typer vendors click: usage errors (unknown command or option, missing or bad value)
        # are its exceptions, which standalone_mode=False hands to us instead of printing.
        if type(error).__name__ == "NoArgsIsHelpError":  # plain `ilrdpo`: the help, as click shows it
            print(error.format_message())
            sys.exit(2)
        print(f"error: {usage_line(error)}", file=sys.stderr)
        sys.exit(2 if error.exit_code == 2 else error.exit_code)
    # standalone_mode=False: typer returns a typer.Exit's status instead of raising it (a command's
    # own return value is None)
    if isinstance(status, int) and status:
        sys.exit(status)


if __name__ == "__main__":
    main()

"""Command line: thin commands over the library functions."""

from __future__ import annotations

import re
import sys

import typer

from ilrdpo.config import GenerationSettings
from ilrdpo.errors import IlrdpoError, UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Iterative Length-Regularized DPO: better answers without longer answers.")

def _print_version(value: bool) -> None:
    if value:
        from ilrdpo import __version__

        print(f"ilrdpo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Iterative Length-Regularized DPO: better answers without longer answers."""
    from ilrdpo import engines  # lazy, as every command's modules here: accelerate loads with the command

    engines.init()  # under accelerate launch / torchrun: join the processes (one: nothing)


# `ilrdpo evaluate`'s defaults are the config's generation defaults: one source of truth.
GENERATION = GenerationSettings()
OVERRIDES = typer.Argument(None, help="section.key=value overrides, e.g. loss.alpha=0.05")


# `--key value`, `--key=value` and `--config FILE` are accepted next to `key=value` (TRL's style).
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
CONFIG_ARGS = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}


@app.command(**CONFIG_ARGS)
def train(config: str | None = typer.Argument(None, help="YAML config (omit for defaults)"),
          overrides: list[str] | None = OVERRIDES,
          overwrite: bool = typer.Option(False, "--overwrite", help="Replace a trained model in output_dir")) -> None:
    """One round of LR-DPO on a preference-pairs file (data.pairs)."""
    from ilrdpo.config import load_config
    from ilrdpo.offline import run_offline

    config, overrides = _split_config(config, overrides)
    run_offline(load_config(config, overrides), overwrite=overwrite)


@app.command(**CONFIG_ARGS)
def run(config: str | None = typer.Argument(None, help="YAML config"),
        overrides: list[str] | None = OVERRIDES,
        force: bool = typer.Option(False, "--force", help="Continue even if the config changed under finished work"),
        redo: str | None = typer.Option(None, "--redo", metavar="ITER:STAGE",
                                        help="Compute again from this stage of this iteration (e.g. 1:generate; "
                                        "0:eval = the initial model's evaluation), and everything after it, with "
                                        "the config given; the replaced files move to OUT/replaced/NNN/")) -> None:
    """The iterative loop: sample, score, pair, train, evaluate; resumes an existing run directory."""
    from ilrdpo.config import load_config
    from ilrdpo.loop import run_iterations
    from ilrdpo.resume import parse_redo

    config, overrides = _split_config(config, overrides)
    point = parse_redo(redo) if redo is not None else None
    run_iterations(load_config(config, overrides), force=force, redo=point)


@app.command()
def evaluate(
    model: str = typer.Option(..., "--model", help="Model folder, hub id, LoRA adapter folder or bundled:NAME"),
    prompts: str = typer.Option(..., "--prompts", help="Eval prompts JSONL (reference / target_length optional)"),
    judge: str | None = typer.Option(None, "--judge", help="YAML with scoring-section keys"),
    baseline: str | None = typer.Option(None, "--baseline", help="Baseline model to compare against"),
    out: str | None = typer.Option(None, "--out", help="Write the result JSON here (answers beside it)"),
    max_new_tokens: int = typer.Option(GENERATION.max_new_tokens, help="Longest answer in tokens"),
    sample: bool = typer.Option(False, "--sample", help="Sample (seeded) instead of greedy decoding"),
    temperature: float = typer.Option(GENERATION.temperature, help="Sampling temperature with --sample"),
    seed: int = typer.Option(0, help="Seed for --sample"),
    batch_size: int = typer.Option(GENERATION.batch_size, help="Sequences decoded together"),
    anchors: bool = typer.Option(False, "--anchors", help="Also answer with the baseline told to be concise and "
                                 "verbose (two more passes): length anchors for the LC fit"),
) -> None:
    """Win rate and length-controlled win rate of a model against a baseline under a judge."""
    import json
    from pathlib import Path

    from ilrdpo import ranks
    from ilrdpo.evaluate import evaluate_models, load_judge_settings, print_evaluation
    from ilrdpo.preflight import check_evaluate
    from ilrdpo.records import atomic_write_text

    judge_settings = load_judge_settings(judge)
    check_evaluate(model, prompts, judge_settings, baseline, out)
    generation = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    out_path = Path(out) if out else None
    result = evaluate_models(model, prompts, judge_settings, baseline=baseline, generation=generation,
                             greedy=not sample, seed=seed, out_dir=out_path.parent if out_path else None,
                             anchors=anchors)
    print_evaluation(result)
    if out_path and ranks.is_main():
        atomic_write_text(out_path, json.dumps(result, indent=1))


@app.command()
def generate(
    model: str = typer.Option(..., "--model", help="Model folder (`ilrdpo run`/`train` output, full or LoRA) or hub id"),
    prompts: str = typer.Option(..., "--prompts", help="Prompts JSONL (strings or message lists; target_length optional)"),
    out: str = typer.Option(..., "--out", help="Output JSONL: prompt, response, candidates"),
    num_samples: int = typer.Option(4, "--num-samples", min=1, help="Answers sampled per prompt"),
    best_of: bool = typer.Option(False, "--best-of", help="Keep the best-scored answer (needs --scorer)"),
    scorer: str | None = typer.Option(None, "--scorer", help="YAML with scoring-section keys"),
    target_length: float | None = typer.Option(None, "--target-length", help="Prefer answers near this length"),
    length_unit: str = typer.Option("tokens", "--length-unit", help="tokens or chars"),
    length_weight: float = typer.Option(0.01, "--length-weight", help="Score lost per unit of |length - target|"),
    max_new_tokens: int = typer.Option(GENERATION.max_new_tokens, help="Longest answer in tokens"),
    temperature: float = typer.Option(GENERATION.temperature, help="Sampling temperature"),
    top_p: float = typer.Option(GENERATION.top_p, help="Nucleus sampling mass"),
    seed: int = typer.Option(0, help="Sampling seed"),
    on_long_prompt: str = typer.Option("truncate", "--on-long-prompt", help="truncate (keep the end) or error"),
) -> None:
    """N answers per prompt from a trained model; --best-of keeps the best under a scorer and a target length."""
    from ilrdpo.config import DataSettings
    from ilrdpo.evaluate import load_judge_settings
    from ilrdpo.generation.best_of import Rerank, generate_file

    if length_unit not in ("tokens", "chars"):
        raise UserInputError(f"option '--length-unit': '{length_unit}' is not tokens or chars")
    generation = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if on_long_prompt not in ("truncate", "error"):
        raise UserInputError(f"option '--on-long-prompt': '{on_long_prompt}' is not truncate or error")
    generate_file(model, prompts, out, num_samples=num_samples, best_of=best_of, seed=seed, generation=generation,
                  data=DataSettings(on_long_prompt=on_long_prompt),
                  scorer=load_judge_settings(scorer) if scorer else None,
                  rerank=Rerank(target_length, length_unit, length_weight))


@app.command()
def chat(
    model: str = typer.Option(..., "--model", help="Model folder (`ilrdpo run`/`train` output, full or LoRA) or hub id"),
    best_of: int = typer.Option(1, "--best-of", min=1, help="Sample N candidates per turn and keep the best"),
    scorer: str | None = typer.Option(None, "--scorer", help="YAML with scoring-section keys (for --best-of)"),
    target_length: float | None = typer.Option(None, "--target-length", help="Prefer replies near this length"),
    length_weight: float = typer.Option(0.01, "--length-weight", help="Score lost per token from the target"),
    system_prompt: str | None = typer.Option(None, "--system", help="System message"),
    max_new_tokens: int = typer.Option(GENERATION.max_new_tokens, help="Longest reply in tokens"),
    temperature: float = typer.Option(GENERATION.temperature, help="Sampling temperature"),
    verbose: bool = typer.Option(False, "--verbose", help="Show every candidate with its score"),
) -> None:
    """Chat with a model in the terminal (/reset, /save FILE, /quit); input may be piped in."""
    from ilrdpo.chat import run_chat
    from ilrdpo.evaluate import load_judge_settings
    from ilrdpo.generation.best_of import Rerank

    run_chat(model, best_of=best_of, scorer=load_judge_settings(scorer) if scorer else None,
             rerank=Rerank(target_length, "tokens", length_weight), system_prompt=system_prompt, verbose=verbose,
             generation=GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature))


@app.command(**CONFIG_ARGS)
def tune(config: str | None = typer.Argument(None, help="YAML config with a tune section"),
         overrides: list[str] | None = OVERRIDES,
         trials: int = typer.Option(10, "--trials", min=1, help="Trials to run in this invocation"),
         storage: str | None = typer.Option(None, "--storage", help="optuna storage URL (default OUT/study.db)"),
         study: str | None = typer.Option(None, "--study", help="Study name (default the output folder's name)"),
         resume: bool = typer.Option(False, "--resume", help="Add trials to an existing study")) -> None:
    """Hyperparameter search (optuna): each trial a short `ilrdpo run`; best config, Pareto set and plots."""
    from ilrdpo.config import load_config
    from ilrdpo.tuning import tune as run_tune

    config, overrides = _split_config(config, overrides)
    run_tune(load_config(config, overrides), trials=trials, storage=storage, study_name=study, resume=resume)


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Folder for both arms and the report"),
    quick: bool = typer.Option(False, "--quick", help="Fewer prompts and iterations (about 4 minutes)"),
    model: str | None = typer.Option(None, "--model", help="Base policy (default: bundled SmolLM2-135M-Instruct)"),
    seed: int = typer.Option(0, help="Seed for both arms"),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2: the demo once "
                                     "per seed (OUT/seed_S) and a table of mean and spread (OUT/study.md)"),
    tune: bool = typer.Option(False, "--tune", help="Instead: search alpha for the demo's setup (one iteration "
                              "per trial; quality LC win rate up, length down: a Pareto set in OUT)"),
    trials: int = typer.Option(6, "--trials", min=1, help="With --tune: trials to run"),
    resume: bool = typer.Option(False, "--resume", help="With --tune: add trials to OUT's study"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Vanilla iterative DPO vs iLR-DPO offline: quality up, length not."""
    from ilrdpo.demo import run_demo, run_study, tune_config

    if tune:
        from ilrdpo.tuning import tune as run_tune

        run_tune(tune_config(out, quick=quick, model=model, seed=seed, overrides=list(overrides or [])),
                 trials=trials, resume=resume)
        return
    if seeds is None:
        run_demo(out, quick=quick, model=model, seed=seed, overrides=list(overrides or []))
        return
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    run_study(out, seed_list, quick=quick, model=model, overrides=list(overrides or []))


@app.command()
def report(run_dirs: list[str] = typer.Argument(..., help="Run directories of `ilrdpo run`"),
           out: str = typer.Option("report", "--out", help="Folder for report.md and plots/"),
           names: str | None = typer.Option(None, "--names", help="Comma-separated run names")) -> None:
    """report.md and plots for one or several runs side by side; tables in the terminal."""
    from pathlib import Path

    from ilrdpo.evaluation.report import load_runs, print_tables, write_report
    from ilrdpo.progress import console

    name_list = names.split(",") if names else None
    path = write_report([Path(d) for d in run_dirs], Path(out), names=name_list)
    print_tables(load_runs([Path(d) for d in run_dirs], name_list))
    console.print(f"report: {path}")


@app.command("config-help")
def config_help() -> None:
    """Every config key with its default and meaning."""
    from rich.table import Table

    from ilrdpo.config import field_docs
    from ilrdpo.progress import console

    table = Table("key", "default", "meaning")
    for key, default, doc in field_docs():
        table.add_row(key, default, doc)
    console.print(table)


def _split_config(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """The config file and the overrides, from `CONFIG k=v ...`, `k=v ...` (no file),
    `--config CONFIG`, `--key value` and `--key=value` in any mix; `--flag` alone means true."""
    tokens = [t for t in (config, *(overrides or [])) if t is not None]
    path, out, i = None, [], 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            if not sep:
                following = tokens[i + 1] if i + 1 < len(tokens) else "--"
                has_value = not following.startswith("--") and not OVERRIDE.match(following)
                value, i = (tokens[i + 1], i + 1) if has_value else ("true", i)
            if key == "config":
                path = value
            else:
                out.append(f"{key.replace('-', '_')}={value}")
        elif OVERRIDE.match(token) or ("=" in token and not token.endswith((".yaml", ".yml"))):
            # key=value, whatever the value (output_dir=runs/x.yaml too); a bare path is the config
            out.append(token)
        elif path is None:
            path = token
        else:
            raise UserInputError(f"override {token!r}: expected section.key=value (or --key value); "
                                 f"the config file is '{path}'")
        i += 1
    return path, out


def _usage_line(error: typer.TyperException) -> str:
    """A click usage error as one line that says what to fix (click's own is a boxed paragraph)."""
    ctx = getattr(error, "ctx", None)
    command = ctx.command_path if ctx is not None else "ilrdpo"
    help_hint = f"see `{command} --help`"
    option = getattr(error, "option_name", None)
    if option and getattr(error, "possibilities", None) is not None:  # NoSuchOption
        known = ", ".join(sorted(error.possibilities)) if error.possibilities else ""
        near = f" (did you mean {known}?)" if known else ""
        overrides = " or a section.key=value override" if command.split()[-1] in ("train", "run") else ""
        return f"option '{option}': no such option for `{command}`{near}; use --help for the options{overrides}"
    param = getattr(error, "param", None)
    if param is not None and getattr(param, "opts", None) and type(error).__name__ == "BadParameter":
        return f"option '{param.opts[0]}': {error.message[:1].lower()}{error.message[1:]}; {help_hint}"
    text = error.format_message().strip() or "usage error"
    # "No such command 'trian'. Did you mean 'train'?" -> "no such command 'trian' (did you mean 'train'?)"
    first, *rest = re.split(r"(?<=[.?])\s+", " ".join(text.split()))
    first = first[:1].lower() + first[1:].rstrip(".")
    extra = f" ({' '.join(rest)[:1].lower()}{' '.join(rest)[1:]})" if rest else ""
    return f"{first}{extra}; {help_hint}"


def main() -> None:
    try:
        app(standalone_mode=False, prog_name="ilrdpo")
    except IlrdpoError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (typer.Abort, typer.Exit) as stop:
        sys.exit(getattr(stop, "exit_code", 1))
    except typer.TyperException as error:
        # typer vendors click: usage errors (unknown command or option, missing or bad value)
        # are its exceptions, which standalone_mode=False hands to us instead of printing.
        if type(error).__name__ == "NoArgsIsHelpError":  # plain `ilrdpo`: the help, as click shows it
            print(error.format_message())
            sys.exit(2)
        print(f"error: {_usage_line(error)}", file=sys.stderr)
        sys.exit(2 if error.exit_code == 2 else error.exit_code)


if __name__ == "__main__":
    main()

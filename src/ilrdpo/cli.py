"""Command line: thin commands over the library functions."""

from __future__ import annotations

import sys

import typer

from ilrdpo.errors import IlrdpoError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Iterative Length-Regularized DPO: better answers without longer answers.")

OVERRIDES = typer.Argument(None, help="section.key=value overrides, e.g. loss.alpha=0.05")


@app.command()
def train(config: str | None = typer.Argument(None, help="YAML config (omit for defaults)"),
          overrides: list[str] | None = OVERRIDES) -> None:
    """One round of LR-DPO on a preference-pairs file (data.pairs)."""
    from ilrdpo.config import load_config
    from ilrdpo.offline import run_offline

    config, overrides = _split_config(config, overrides)
    run_offline(load_config(config, overrides))


@app.command()
def run(config: str | None = typer.Argument(None, help="YAML config"),
        overrides: list[str] | None = OVERRIDES,
        force: bool = typer.Option(False, "--force", help="Continue even if the config changed under finished work")) -> None:
    """The iterative loop: sample, score, pair, train, evaluate; resumes an existing run directory."""
    from ilrdpo.config import load_config
    from ilrdpo.loop import run_iterations

    config, overrides = _split_config(config, overrides)
    run_iterations(load_config(config, overrides), force=force)


@app.command()
def evaluate(
    model: str = typer.Option(..., "--model", help="Model folder, hub id, LoRA adapter folder or bundled:NAME"),
    prompts: str = typer.Option(..., "--prompts", help="Eval prompts JSONL (reference / target_length optional)"),
    judge: str | None = typer.Option(None, "--judge", help="YAML with scoring-section keys"),
    baseline: str | None = typer.Option(None, "--baseline", help="Baseline model to compare against"),
    out: str | None = typer.Option(None, "--out", help="Write the result JSON here (answers beside it)"),
    max_new_tokens: int = typer.Option(256, help="Longest answer in tokens"),
    sample: bool = typer.Option(False, "--sample", help="Sample (seeded) instead of greedy decoding"),
    temperature: float = typer.Option(0.7, help="Sampling temperature with --sample"),
    seed: int = typer.Option(0, help="Seed for --sample"),
    batch_size: int = typer.Option(32, help="Sequences decoded together"),
) -> None:
    """Win rate and length-controlled win rate of a model against a baseline under a judge."""
    import json
    from pathlib import Path

    from ilrdpo.config import GenerationSettings
    from ilrdpo.evaluation.pairwise import evaluate_models, load_judge_settings, print_evaluation
    from ilrdpo.records import atomic_write_text

    generation = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    out_path = Path(out) if out else None
    result = evaluate_models(model, prompts, load_judge_settings(judge), baseline=baseline, generation=generation,
                             greedy=not sample, seed=seed, out_dir=out_path.parent if out_path else None)
    print_evaluation(result)
    if out_path:
        atomic_write_text(out_path, json.dumps(result, indent=1))


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", help="Folder for both arms and the report"),
    quick: bool = typer.Option(False, "--quick", help="Fewer prompts and iterations (about 4 minutes)"),
    model: str | None = typer.Option(None, "--model", help="Base policy (default: bundled SmolLM2-135M-Instruct)"),
    seed: int = typer.Option(0, help="Seed for both arms"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Vanilla iterative DPO vs iLR-DPO offline: quality up, length not."""
    from ilrdpo.demo import run_demo

    run_demo(out, quick=quick, model=model, seed=seed, overrides=list(overrides or []))


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
    """Allow `ilrdpo train k=v` with no config file: a first argument with '=' is an override."""
    overrides = list(overrides or [])
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def main() -> None:
    try:
        app(standalone_mode=False)
    except IlrdpoError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (typer.Abort, typer.Exit) as stop:
        sys.exit(getattr(stop, "exit_code", 1))
    except Exception as error:  # click usage errors keep their own exit status
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()

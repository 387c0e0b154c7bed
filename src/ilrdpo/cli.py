"""Command line: thin commands over the library functions."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ilrdpo.errors import IlrdpoError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Iterative Length-Regularized DPO: better answers without longer answers.")

OVERRIDES = typer.Argument(None, help="section.key=value overrides, e.g. loss.alpha=0.05")


@app.command()
def train(config: Optional[str] = typer.Argument(None, help="YAML config (omit for defaults)"),
          overrides: Optional[list[str]] = OVERRIDES) -> None:
    """One round of LR-DPO on a preference-pairs file (data.pairs)."""
    from ilrdpo.config import load_config
    from ilrdpo.loop import run_offline

    config, overrides = _split_config(config, overrides)
    run_offline(load_config(config, overrides))


@app.command()
def run(config: Optional[str] = typer.Argument(None, help="YAML config"),
        overrides: Optional[list[str]] = OVERRIDES,
        force: bool = typer.Option(False, "--force", help="Continue even if the config changed under finished work")) -> None:
    """The iterative loop: sample, score, pair, train, evaluate; resumes an existing run directory."""
    from ilrdpo.config import load_config
    from ilrdpo.loop import run_iterations

    config, overrides = _split_config(config, overrides)
    run_iterations(load_config(config, overrides), force=force)


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

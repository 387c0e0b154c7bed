"""The command line's words: a config file and overrides from any mix of forms, and click's usage
errors as one line that says what to fix."""

from __future__ import annotations

import re

import typer

from ilrdpo.errors import UserInputError

# `--key value`, `--key=value` and `--config FILE` are accepted next to `key=value` (TRL's style).
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def split_config(config: str | None, overrides: list[str] | None,
                  config_file: str | None = None) -> tuple[str | None, list[str]]:
    """The config file and the overrides, from `CONFIG k=v ...`, `k=v ...` (no file),
    `--config CONFIG`, `--key value` and `--key=value` in any mix; `--flag` alone means true."""
    tokens = [t for t in (config, *(overrides or [])) if t is not None]
    if config_file is not None:
        tokens = ["--config", config_file, *tokens]
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


def usage_line(error: typer.TyperException) -> str:
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

"""A server command started for one round and stopped before training needs the accelerator.

`generation.server.command` is a template: {model} becomes the round's model folder (quoted for
the shell), {port} a free local port. The command runs in its own session (process group), with
its output in a log file; it is ready when GET /v1/models answers, waited for as long as its
process lives (a line every WAIT_REPORT_S seconds; one line naming the log when it exits; loading
a large model can take many minutes, and ctrl-C stops the wait). Stopping sends SIGTERM to the
whole group (vLLM's engine processes included), waits, then SIGKILL; if ilrdpo itself is killed,
the kernel sends the server SIGTERM (_die_with_parent).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ilrdpo.errors import UserInputError
from ilrdpo.progress import console
from ilrdpo.serving.client import API_KEY_VARIABLE, Client, ServerError, api_key

STOP_TIMEOUT_S = 30.0  # SIGTERM, then this long, then SIGKILL
POLL_S = 0.5
WAIT_REPORT_S = 30.0  # a line this often while a started server loads
SHELL_SYNTAX = set(";|&<>`$()*?~")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_command(template: str, model: str, port: int) -> str:
    try:
        return template.format(model=shlex.quote(model), port=port)
    except (KeyError, IndexError, ValueError) as error:
        raise UserInputError(f"config key 'generation.server.command': bad placeholder ({error}); "
                             "use {model} and {port}") from None


def log_tail(log: Path, lines: int = 3, width: int = 300) -> str:
    """The last lines of a server's output, on one line."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "no output"
    tail = " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())
    return (tail[-width:] if len(tail) > width else tail) or "no output"


def direct_argv(template: str, command: str) -> tuple[list[str] | None, dict[str, str]]:
    """(argv, environment assignments) of a command that needs no shell (`VAR=1 vllm serve ...`):
    run directly, the server is ilrdpo's own child and dies with it (_die_with_parent). (None, {})
    for one with shell syntax (pipes, `;`, `&&`, redirections, `$`), run by /bin/sh."""
    if any(c in template for c in SHELL_SYNTAX):
        return None, {}
    try:
        words = shlex.split(command)
    except ValueError:
        return None, {}
    env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    return (words or None), env


@contextlib.contextmanager
def started_server(template: str, model: str, log: Path) -> Iterator[str]:
    """Start the command for `model`, yield its URL once it answers, stop it afterwards."""
    port = free_port()
    command = render_command(template, model, port)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"$ {command}\n".encode())
        out.flush()
        argv, env = direct_argv(template, command)
        try:
            process = subprocess.Popen(argv or command, shell=argv is None, env={**os.environ, **env},
                                       start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent)  # noqa: PLW1509 (one C call, resolved before the fork)
        except OSError as error:  # argv[0] not found or not executable
            raise ServerError(f"generation.server.command: cannot run '{argv[0] if argv else command}' "
                              f"({error.strerror})") from None
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, url, log)
        yield url
    finally:
        stop(process)


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when ilrdpo's process dies, SIGKILL included, so
    that a killed run leaves no server holding the GPU. The shell runs a simple command by exec,
    a command without shell syntax is run directly (direct_argv), so the server itself has it; under
    a shell (`a; b`) only the shell has it."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    """Until GET /v1/models answers 200, for as long as the process lives: no time limit, since
    how long a model takes to load is the server's business, but a line every WAIT_REPORT_S
    seconds saying what is awaited. A refused API key or an exit is one line naming the log."""
    probe = Client(url, timeout=5.0, what="generation.server.command")
    start = reported = time.monotonic()
    while process.poll() is None:
        status = probe.status("/v1/models")
        if status == 200:
            return
        if status in (401, 403):
            given = "is not set" if api_key() is None else "is not the server's key"
            raise ServerError(f"generation.server.command {url}/v1/models: HTTP {status}: ${API_KEY_VARIABLE} "
                              f"{given} ({log})")
        if time.monotonic() - reported >= WAIT_REPORT_S:
            reported = time.monotonic()
            state = "no connection yet" if status is None else f"HTTP {status}"
            console.print(f"waiting for generation.server.command to answer {url}/v1/models: "
                          f"{reported - start:.0f} s so far ({state}; its output: {log})",
                          markup=False, highlight=False, soft_wrap=True)
        time.sleep(POLL_S)
    raise ServerError(f"generation.server.command exited with status {process.returncode} before it answered "
                      f"({log}): {log_tail(log)}")


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the command's process group, then SIGKILL after `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            _reap_group(process.pid, wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _reap_group(pgid: int, timeout: float) -> None:
    """Wait until no process of the group is left (the shell may exit before the server it started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise subprocess.TimeoutExpired(f"process group {pgid}", timeout)

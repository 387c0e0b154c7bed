"""A server command started for one round and stopped before training needs the accelerator.

`generation.server.command` is a template: {model} becomes the round's model folder (quoted for
the shell), {port} a free local port. The command runs in its own session (process group), with
its output in a log file; it is ready when GET /v1/models answers. Stopping sends SIGTERM to the
whole group (vLLM's engine processes included), waits, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from ilrdpo.errors import UserInputError
from ilrdpo.serving.client import Client, ServerError

STOP_TIMEOUT_S = 30.0  # SIGTERM, then this long, then SIGKILL
POLL_S = 0.5


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


@contextlib.contextmanager
def started_server(template: str, model: str, log: Path, timeout: float) -> Iterator[str]:
    """Start the command for `model`, yield its URL once it answers, stop it afterwards."""
    port = free_port()
    command = render_command(template, model, port)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"$ {command}\n".encode())
        out.flush()
        process = subprocess.Popen(command, shell=True, start_new_session=True, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(process, url, log, timeout)
        yield url
    finally:
        stop(process)


def _wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    probe = Client(url, timeout=5.0, what="generation.server.command")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"generation.server.command exited with status {process.returncode} before it "
                              f"answered ({log}): {log_tail(log)}")
        with contextlib.suppress(ServerError):
            probe.get("/v1/models", retry=False)
            return
        time.sleep(POLL_S)
    raise ServerError(f"generation.server.command did not answer at {url} within {timeout:g} s "
                      f"(generation.server.timeout; {log}): {log_tail(log)}")


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

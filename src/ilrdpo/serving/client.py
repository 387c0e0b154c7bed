"""A small JSON client for OpenAI-compatible servers: timeouts, retries with exponential backoff
on connection errors, timeouts, 408, 429 and 5xx, then one line naming the URL and the status.
The standard library only (urllib): one blocking call per thread, the caller bounds concurrency.

The API key of every server ilrdpo talks to (the generation server, a remote scorer, an LLM
judge) is $OPENAI_API_KEY where it is set, as the openai client reads it: sent as a bearer token,
never written anywhere (no message holds it); unset, requests carry no Authorization header.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from ilrdpo.errors import IlrdpoError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # waits before the 2nd..6th try: 15.5 s in all
RESUME_HINT = "run the same command again when it answers: finished prompts are kept"
REQUEST_TIMEOUT_S = 600.0  # one answer (a long batch on a busy server included)
API_KEY_VARIABLE = "OPENAI_API_KEY"


class ServerError(IlrdpoError):
    """A server that does not answer, or answers with an error or a malformed body (exit status 1:
    the fix is the server's, and the same command then resumes)."""


def base_url(url: str) -> str:
    """http://host:port, from a URL given with or without its /v1 (or a trailing slash)."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def api_key() -> str | None:
    """The servers' API key: $OPENAI_API_KEY, None where it is unset or empty."""
    return os.environ.get(API_KEY_VARIABLE) or None


class Client:
    """POST/GET JSON to one server. `what` names the server in messages (a config key); `timeout`
    is the seconds one answer may take."""

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT_S, what: str = "server",
                 delays: tuple[float, ...] | None = None) -> None:
        self.url, self.timeout, self.what = base_url(url), timeout, what
        self.delays = RETRY_DELAYS_S if delays is None else delays
        self._headers = {"Content-Type": "application/json"}
        key = api_key()
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def post(self, path: str, body: dict[str, Any], retry: bool = True, expect_json: bool = True) -> Any:
        return self._call(path, json.dumps(body).encode(), retry, expect_json)

    def get(self, path: str, retry: bool = True) -> Any:
        return self._call(path, None, retry)

    def status(self, path: str) -> int | None:
        """The HTTP status of one GET, None where nothing answered (no retries, never raises)."""
        return self._once(self.url + path, None)[0]

    def _call(self, path: str, data: bytes | None, retry: bool, expect_json: bool = True) -> Any:
        url = self.url + path
        tries = len(self.delays) + 1 if retry else 1
        for attempt in range(tries):
            if attempt:
                time.sleep(self.delays[attempt - 1])
            status, reason, text = self._once(url, data)
            if status == 200:
                return _parse(url, text, self.what) if expect_json else text
            if status is not None and status not in RETRY_STATUSES:
                raise ServerError(f"{self.what} {url}: HTTP {status}: {_detail(text)}")
        where = f"HTTP {status} ({_detail(text)})" if status is not None else reason
        raise ServerError(f"{self.what} {url}: {where} after {tries} tries; {RESUME_HINT}")

    def _once(self, url: str, data: bytes | None) -> tuple[int | None, str, str]:
        """(HTTP status or None, what went wrong without one, body text)."""
        request = urllib.request.Request(url, data=data, headers=self._headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, "", response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            return error.code, "", error.read().decode("utf-8", "replace")
        except TimeoutError:
            return None, f"no answer within {self.timeout:g} s", ""
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, TimeoutError):
                return None, f"no answer within {self.timeout:g} s", ""
            return None, f"cannot connect ({getattr(reason, 'strerror', None) or reason})", ""
        except (ConnectionError, OSError) as error:  # reset or closed mid-answer
            return None, f"connection lost ({error.strerror or type(error).__name__})", ""


def _parse(url: str, text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ServerError(f"{what} {url}: the answer is not JSON ({_detail(text)})") from None


def _detail(text: str) -> str:
    """The server's error message, on one line and short."""
    try:
        body = json.loads(text)
        if isinstance(body, dict):
            inner = body.get("detail") or body.get("error") or body.get("message") or body
            text = inner.get("message", inner) if isinstance(inner, dict) else inner
    except ValueError:
        pass
    line = " ".join(str(text).split())
    return (line[:200] + "...") if len(line) > 200 else line or "empty body"

"""A local HTTP server in a thread, for the clients of OpenAI-compatible servers: each request is
answered by `answer(path, body) -> (status, text)` (body: the parsed JSON, None for a GET); the
requests are kept in order. `answer` may sleep, to let a client time out."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from typing import Any

from typing_extensions import Self

Answer = Callable[[str, Any], tuple[int, str]]


class LocalServer:
    def __init__(self, answer: Answer) -> None:
        self.answer, self.requests = answer, []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, body: Any) -> None:
                owner.requests.append((self.path, body, dict(self.headers)))
                status, text = owner.answer(self.path, body)
                data = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                    pass

            def do_GET(self) -> None:
                self._reply(None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self._reply(json.loads(self.rfile.read(length) or b"null"))

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ok(payload: Any) -> tuple[int, str]:
    return 200, json.dumps(payload)

"""The common part of our scripted test servers: real HTTP on 127.0.0.1, answers decided by a script.

Why shared: the chat server and the image-edit server differ only in what one request means; starting,
stopping, the script's step order and the JSON answer are the same, and they must behave alike when a
client times out or retries.

Script steps are dicts; the last one repeats. Every parsed request is kept in `requests`.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler that stays quiet and answers JSON, tolerating clients that already gave up."""

    def log_message(self, *_: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)


class ScriptedServer:
    """Start with `with Server([...]) as server:`; `server.base_url` ends in /v1.

    Subclasses implement `_handler()`, returning a `JSONHandler` subclass that calls
    `server._next_step(request)` once per request.
    """

    def __init__(self, script: list[dict[str, Any]], port: int = 0) -> None:
        if not script:
            raise ValueError("the script needs at least one step")
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_step(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            index = min(len(self.requests), len(self.script) - 1)
            self.requests.append(request)
            return self.script[index]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

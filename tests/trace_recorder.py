"""A LangSmith endpoint on 127.0.0.1 that records and decodes what the LangSmith client sends.

Decodes the three ways a client sends runs: ``POST /runs/multipart`` (multipart form, optionally
zstd-compressed; parts ``post.<id>``, ``patch.<id>`` and ``post.<id>.inputs`` ...), ``POST /runs/batch``
(JSON ``{"post": [...], "patch": [...]}``) and single ``POST /runs`` / ``PATCH /runs/<id>``. `runs()`
merges every post and patch of a run into one dict, the way LangSmith stores it. With ``status`` set,
every ingest request is answered with that status instead (a failing endpoint); `requests` counts them.
"""

from __future__ import annotations

import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class TraceRecorder:
    """Start with ``with TraceRecorder() as recorder:``; point ``LANGSMITH_ENDPOINT`` at `recorder.url`."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.raw: list[bytes] = []  # the decoded body of every ingest request, in order
        self.operations: list[tuple[str, dict[str, Any]]] = []  # ("post" | "patch", run fields)
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:  # /info: no special features, so the client uses its defaults
                self._answer(200, {"version": "0.0-recorder"} if self.path.rstrip("/").endswith("/info") else {})

            def do_POST(self) -> None:
                recorder._ingest(self)

            def do_PATCH(self) -> None:
                recorder._ingest(self)

            def _answer(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "TraceRecorder":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def requests(self) -> int:
        return len(self.raw)

    def runs(self) -> dict[str, dict[str, Any]]:
        """Every run by id: its posted fields updated by its patches, in arrival order."""
        merged: dict[str, dict[str, Any]] = {}
        for _, fields in self.operations:
            run = merged.setdefault(str(fields.get("id")), {})
            run.update({k: v for k, v in fields.items() if v is not None})
        return merged

    # ------------------------------------------------------------------------------------- decoding

    def _ingest(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        if (handler.headers.get("Content-Encoding") or "").lower() == "zstd":
            import zstandard

            body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
        with self._lock:
            self.raw.append(body)
            if self.status == 200:
                self.operations.extend(_decode(handler.command, handler.path, handler.headers.get("Content-Type", ""), body))
        handler._answer(self.status, {} if self.status == 200 else {"detail": "recorder refuses"})  # type: ignore[attr-defined]


def _decode(method: str, path: str, content_type: str, body: bytes) -> list[tuple[str, dict[str, Any]]]:
    if path.rstrip("/").endswith("/runs/multipart"):
        return _decode_multipart(content_type, body)
    data = json.loads(body or b"{}")
    if path.rstrip("/").endswith("/runs/batch"):
        return [(kind, run) for kind in ("post", "patch") for run in data.get(kind) or []]
    if method == "PATCH":
        return [("patch", {**data, "id": path.rstrip("/").rsplit("/", 1)[-1]})]
    return [("post", data)]


def _decode_multipart(content_type: str, body: bytes) -> list[tuple[str, dict[str, Any]]]:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    operations: dict[tuple[str, str], dict[str, Any]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition") or ""
        kind, _, rest = name.partition(".")
        run_id, _, field = rest.partition(".")
        if kind not in ("post", "patch") or not run_id:
            continue  # attachments and feedback are not runs
        payload = part.get_payload(decode=True) or b""
        fields = operations.setdefault((kind, run_id), {"id": run_id})
        value = json.loads(payload) if payload else None
        if field:
            fields[field] = value
        elif isinstance(value, dict):
            fields.update(value)
    return [(kind, fields) for (kind, _), fields in operations.items()]

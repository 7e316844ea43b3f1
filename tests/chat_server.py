"""A tiny OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, answers from a script.

Why: the malformed cases (garbage text, unknown tools, bad JSON, no call), the failing cases (HTTP 500,
an answer slower than the client's timeout) and the judge/PG backends need an endpoint whose answers a
test decides. This is a real server (sockets, HTTP parsing, JSON), not a mock of the client: the code
under test talks to it exactly as it would to vLLM.

Each script step is one of:
    {"content": str | None, "tool_calls": [...]}   a chat completion with that assistant message
    {"status": 500}                                  an error answer with that HTTP status
    {"sleep": seconds, ...}                          wait before answering (the rest of the step)
The last step repeats. Every request body is kept in `requests`.
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from scripted_http import JSONHandler, ScriptedServer


class ScriptedChatServer(ScriptedServer):
    """Start with `with ScriptedChatServer([...]) as server:`; `server.base_url` ends in /v1."""

    def __init__(self, script: list[dict[str, Any]], model: str = "scripted") -> None:
        self.model = model
        super().__init__(script)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(JSONHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                step = server._next_step(body)
                if step.get("sleep"):
                    time.sleep(step["sleep"])
                if step.get("status"):
                    self._send(step["status"], {"error": {"message": f"scripted failure {step['status']}"}})
                    return
                message = {"role": "assistant", "content": step.get("content")}
                if step.get("tool_calls"):
                    message["tool_calls"] = step["tool_calls"]
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": server.model,
                        "choices": [
                            {"index": 0, "message": message,
                             "finish_reason": "tool_calls" if step.get("tool_calls") else "stop"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

        return Handler


def native_call(name: str, arguments: str, call_id: str = "call_x") -> dict[str, Any]:
    """One tool call as an OpenAI server returns it (arguments are a JSON string, possibly broken)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}

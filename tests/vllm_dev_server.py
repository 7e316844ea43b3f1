"""The dev routes of a vLLM server that GRPO's weight sync uses, for tests: real HTTP on 127.0.0.1.

Why: vLLM does not install on a CPU machine, yet the sync must be tested against its behaviour, read
from its source: ``POST /collective_rpc`` runs a worker-extension method; ``POST /reset_prefix_cache``
answers 200 whatever happens and the reset only takes effect when no request holds a KV block
(`BlockPool.reset_prefix_cache` refuses otherwise); ``GET /metrics`` exposes the scheduler's gauges and
counters under vLLM's names (`vllm.v1.metrics.loggers.PrometheusStatLogger`), written here with
prometheus_client as vLLM does.

State: `busy_polls` /metrics answers with one request running and holding blocks (then it finishes);
`arrivals_at_reset` resets that a new request beats (it holds blocks when the reset runs, so the
reset fails, and finishes before the next /metrics answer). `effective_resets` counts the resets that
took effect, `resets` all of them.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from scripted_http import JSONHandler, ScriptedServer


class VLLMDevServer(ScriptedServer):
    """Start with `with VLLMDevServer(busy_polls=3) as server:`; `server.base_url` ends in /v1."""

    def __init__(self, busy_polls: int = 0, arrivals_at_reset: int = 0) -> None:
        self.busy_polls = busy_polls
        self.arrivals_at_reset = arrivals_at_reset
        self.resets = 0
        self.effective_resets = 0
        self.rpc: list[dict[str, Any]] = []
        self._state = threading.Lock()
        self._registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self._running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels, registry=self._registry)
        self._waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels, registry=self._registry)
        self._usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels, registry=self._registry)
        self._prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels, registry=self._registry)
        self._queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries.", labels, registry=self._registry)
        self._set(running=1 if busy_polls else 0)
        super().__init__([{}])

    def _set(self, running: int) -> None:
        self._running.labels("policy", "0").set(running)
        self._waiting.labels("policy", "0").set(0)
        self._usage.labels("policy", "0").set(0.25 * running)

    def _request_finished(self) -> None:
        self._prompt.labels("policy", "0").inc(40)
        self._queries.labels("policy", "0").inc(40)
        self._set(running=0)

    def metrics(self) -> bytes:
        with self._state:
            text = generate_latest(self._registry)
            if self.busy_polls:
                self.busy_polls -= 1
                if not self.busy_polls:
                    self._request_finished()
            return text

    def reset(self) -> None:
        with self._state:
            self.resets += 1
            if self.arrivals_at_reset:
                self.arrivals_at_reset -= 1
                self._request_finished()  # it held blocks during the reset, and is done by the next poll
            elif not self.busy_polls:
                self.effective_resets += 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(JSONHandler):
            def do_GET(self) -> None:
                if self.path != "/metrics":
                    self._send(404, {"detail": "Not Found"})
                    return
                data = server.metrics()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/collective_rpc":
                    server.rpc.append(json.loads(body))
                    self._send(200, {"results": [1]})
                elif self.path.startswith("/reset_prefix_cache"):
                    server.reset()
                    self.send_response(200)  # vLLM answers 200 whether or not the reset took effect
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(404, {"detail": "Not Found"})

        return Handler

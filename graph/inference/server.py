"""`anomaly-agent serve-policy`: a small OpenAI-compatible chat server over a local transformers model.

Why: vLLM does not run on a CPU machine, yet the `openai` policy, GRPO rollouts and tests need a real
endpoint. This serves one model folder (default: SmolLM2-135M-Instruct) with the same generation code
as the in-process `local` policy (`graph.inference.model`).

Endpoints:
    GET  /v1/models             the one served model
    POST /v1/chat/completions   ``messages``, ``tools``, ``temperature`` (default 1.0, as OpenAI),
                                ``max_tokens`` / ``max_completion_tokens``, ``n``, ``stop``, ``seed``,
                                ``logprobs``, ``return_token_ids``; no streaming
    GET  /health                200 once the model is loaded
    POST /v1/load_weights       ``{"path": FOLDER}``: load the ``*.safetensors`` tensors there into the model
                                (GRPO's weight sync between steps; `training.grpo_sync`)

Requests are served one at a time (one model); a request whose client disconnects (e.g. on its
timeout) is cancelled between two tokens, so the client's retry does not queue behind abandoned work.

Tool calls are parsed from the model's text (``<tool_call>{json}</tool_call>`` or a bare JSON call) and
returned as native ``tool_calls`` with ``finish_reason: "tool_calls"``; ``content`` keeps the text
before the calls. When the text holds a call that cannot be parsed, no ``tool_calls`` are returned and
``content`` is the full text, so the client can report the bad call (as vLLM does).

Extra fields, for training (GRPO must keep the exact tokens the policy sampled):
    choice.raw_text          always: the generated text, without the end-of-turn token
    choice.token_ids         with ``return_token_ids: true`` (or ``logprobs: true``): generated ids
    prompt_token_ids         top level, with ``return_token_ids: true``: the rendered prompt's ids
    choice.logprobs          with ``logprobs: true``: OpenAI format, ``{"content": [{"token", "logprob",
                             "bytes", "top_logprobs": []}]}``; log-probabilities under the model's raw
                             distribution (temperature 1), like vLLM's default
The field names follow vLLM (``return_token_ids``, ``token_ids``, ``prompt_token_ids``), so one client
works against both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from graph.errors import PolicyError
from graph.inference.hermes import parse_completion
from graph.inference.model import LocalModel
from graph.inference.types import Generation, GenerationCancelled

logger = logging.getLogger(__name__)

#: How often a running request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


class ChatRequest(BaseModel):
    """The part of OpenAI's chat-completions request this server honours; other fields are ignored."""

    model_config = ConfigDict(extra="allow")

    messages: list[dict[str, Any]] = Field(min_length=1)
    model: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    return_token_ids: bool = False
    stream: bool = False


def create_app(model: LocalModel, served_name: str | None = None, default_max_tokens: int = 512) -> Starlette:
    """The ASGI app serving `model` under `served_name` (default: the folder's name)."""
    name = served_name or model.name

    async def models(_: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "anomaly-agent"}]}
        )

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": name})

    async def chat_completions(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        try:
            chat = ChatRequest.model_validate(body)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return _error(400, f"invalid request field '{where}': {first['msg']}")
        if chat.stream:
            return _error(400, "streaming is not supported by serve-policy; send stream: false")
        if chat.tool_choice not in (None, "auto", "none"):
            return _error(400, "tool_choice must be 'auto' or 'none' (forced calls are not supported)")
        cancel = threading.Event()
        work = asyncio.ensure_future(run_in_threadpool(_generate, model, chat, default_max_tokens, cancel))
        while not work.done():
            await asyncio.wait({work}, timeout=_DISCONNECT_POLL_S)
            if not work.done() and await request.is_disconnected():
                cancel.set()  # the client gave up (timeout): free the model for the next request
        try:
            generations = work.result()
        except GenerationCancelled:
            logger.info("client disconnected; generation cancelled")
            return _error(499, "client closed the request", "cancelled")
        except PolicyError as error:
            return _error(400, str(error))
        except Exception as error:  # a model failure must answer 500, not drop the connection
            logger.exception("generation failed")
            return _error(500, f"generation failed: {type(error).__name__}: {error}", "server_error")
        return JSONResponse(_response(name, chat, generations))

    async def load_weights(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        path = body.get("path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            return _error(400, "give the folder to load from: {\"path\": \"/abs/folder\"}")
        try:
            count = await run_in_threadpool(model.load_weights, path)
        except PolicyError as error:
            return _error(400, str(error))
        return JSONResponse({"status": "ok", "tensors": count, "path": path})

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/load_weights", load_weights, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes)


def _generate(model: LocalModel, chat: ChatRequest, default_max_tokens: int, cancel: threading.Event) -> list[Generation]:
    stop = [chat.stop] if isinstance(chat.stop, str) else list(chat.stop or [])
    temperature = 1.0 if chat.temperature is None else chat.temperature
    tools = None if chat.tool_choice == "none" else chat.tools
    out = []
    for i in range(chat.n):
        out.append(
            model.generate(
                chat.messages,
                tools=tools,
                temperature=temperature,
                max_new_tokens=chat.max_completion_tokens or chat.max_tokens or default_max_tokens,
                stop=stop or None,
                seed=None if chat.seed is None else chat.seed + i,
                logprobs=chat.logprobs,
                cancel=cancel,
            )
        )
    return out


def _response(name: str, chat: ChatRequest, generations: list[Generation]) -> dict[str, Any]:
    choices = []
    for index, generation in enumerate(generations):
        message, finish = _assistant_message(generation, parse_calls=bool(chat.tools) and chat.tool_choice != "none")
        choice: dict[str, Any] = {
            "index": index,
            "message": message,
            "finish_reason": finish,
            "logprobs": _logprobs(generation) if chat.logprobs else None,
            "raw_text": generation.text,
        }
        if chat.return_token_ids or chat.logprobs:
            choice["token_ids"] = generation.token_ids
        choices.append(choice)
    prompt_tokens = len(generations[0].prompt_token_ids)
    completion_tokens = sum(len(g.token_ids) for g in generations)
    response: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    if chat.return_token_ids:
        response["prompt_token_ids"] = generations[0].prompt_token_ids
    return response


def _assistant_message(generation: Generation, *, parse_calls: bool) -> tuple[dict[str, Any], str]:
    """The OpenAI assistant message and finish reason for one generation (see the module docstring)."""
    if parse_calls:
        parsed = parse_completion(generation.text)
        if parsed.tool_calls and not parsed.invalid_tool_calls:
            calls = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(call["args"], ensure_ascii=False)},
                }
                for call in parsed.tool_calls
            ]
            content = parsed.content if isinstance(parsed.content, str) and parsed.content else None
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": generation.text}, generation.finish_reason


def _logprobs(generation: Generation) -> dict[str, Any]:
    return {
        "content": [
            {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")), "top_logprobs": []}
            for token, logprob in zip(generation.tokens, generation.logprobs)
        ]
    }


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def serve(model_path: str | None, host: str = "127.0.0.1", port: int = 8000, served_name: str | None = None,
          max_tokens: int = 512) -> None:
    """Load the model (failing fast with a clear error), then serve until interrupted."""
    import uvicorn

    from graph.inference.model import load_local_model

    model = load_local_model(model_path)
    app = create_app(model, served_name, default_max_tokens=max_tokens)
    logger.warning("serving %s at http://%s:%d/v1", served_name or model.name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)

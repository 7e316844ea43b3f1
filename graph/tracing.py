"""LangSmith traces of a run: named after its task, tagged, small, and cheap when the endpoint is down.

What a traced run looks like (DESIGN §3): the graph's run is renamed ``anomaly-agent <category>/<type>``
and carries tags and metadata (category, anomaly_type, seed, policy, model, backends); each tool call is
a ``tool`` run and each call of a model policy an ``llm`` run (LangChain callbacks, so Studio and any
other callback handler see them too). Pixels never reach a trace: data URLs and long base64 strings are
replaced by a short placeholder, and a node's input shows the task fields and the latest messages, not
the whole conversation again at every step.

Why a client of our own (`configure_tracing`): LangSmith's default client retries a refused
connection with back-off, several times per batch, when the process exits; with a dead endpoint that
added seconds to every command. Ours tries each send without transport retries and with a short
connect timeout, so a dead endpoint costs a few fast failures per batch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests
from langchain_core.callbacks import CallbackManagerForToolRun
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import get_callback_manager_for_config
from langchain_core.tracers.langchain import LangChainTracer

from graph.configuration import Configuration

logger = logging.getLogger(__name__)

#: Seconds a trace send may wait to connect / for an answer (LangSmith's own: 3 and 10, with retries).
CONNECT_TIMEOUT_S = 0.3
READ_TIMEOUT_S = 5.0
#: urllib3 retries per send (LangSmith's own: 3 with back-off); its client still tries a batch 3 times.
TRANSPORT_RETRIES = 0
#: Messages of the conversation a node's traced input keeps (the rest are counted).
TRACED_MESSAGES = 2

_DATA_URL = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/=]{512,}")  # no spaces: long prose is never taken for base64


class BoundedSession(requests.Session):
    """A `requests.Session` whose every request waits at most `CONNECT_TIMEOUT_S` / `READ_TIMEOUT_S`.

    Why a session: LangSmith passes its own (3 s, 10 s) timeout to each background send; capping it
    here is the one place that bounds a send to a dead or unreachable endpoint.
    """

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["timeout"] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        return super().request(method, url, *args, **kwargs)


def tracing_client() -> Any:
    """A LangSmith client that scrubs inputs and outputs and gives up quickly on a dead endpoint."""
    from langsmith import Client
    from urllib3.util.retry import Retry

    return Client(session=BoundedSession(), retry_config=Retry(total=TRANSPORT_RETRIES), hide_inputs=scrub, hide_outputs=scrub)


_configured = False


def configure_tracing() -> bool:
    """Install `tracing_client` as LangSmith's client when tracing is on (once per process).

    Returns whether tracing is on. Called when a graph is built, so the CLI, batches and the LangGraph
    server all trace through it.
    """
    global _configured
    from langsmith import utils

    if not utils.tracing_is_enabled():
        return False
    if not _configured:
        import langsmith

        langsmith.configure(client=tracing_client())
        _configured = True
    return True


# ------------------------------------------------------------------------------------ what is sent


def scrub(data: Any) -> Any:
    """`data` without pixels: data URLs and long base64 runs become ``<data URL, N chars>``; an agent
    state keeps its last `TRACED_MESSAGES` messages and counts the others."""
    if isinstance(data, str):
        return _BASE64.sub(lambda m: f"<base64, {len(m.group())} chars>", _DATA_URL.sub(_placeholder, data))
    if isinstance(data, BaseMessage):
        return data.model_copy(update={"content": scrub(data.content)})
    if isinstance(data, dict):
        out = {k: scrub(v) for k, v in data.items()}
        messages = out.get("messages")
        if "run_dir" in out and isinstance(messages, list) and len(messages) > TRACED_MESSAGES:
            out["messages"] = messages[-TRACED_MESSAGES:]
            out["earlier_messages"] = len(messages) - TRACED_MESSAGES
        return out
    if isinstance(data, (list, tuple)):
        return type(data)(scrub(v) for v in data)
    return data


def _placeholder(match: re.Match[str]) -> str:
    return f"<data URL, {len(match.group())} chars>"


def run_labels(state: dict[str, Any], cfg: Configuration) -> tuple[str, list[str], dict[str, Any]]:
    """The traced name, tags and metadata of a run on `state`'s task."""
    category, anomaly_type = state.get("category", "?"), state.get("anomaly_type", "?")
    metadata = {
        "category": category,
        "anomaly_type": anomaly_type,
        "seed": state.get("seed"),
        "policy": cfg.policy.kind,
        "model": cfg.policy.model,
        "backends": {
            "prompt": cfg.prompt.backend,
            "image": cfg.image.backend,
            "judge": cfg.judge.backend,
            "knowledge": cfg.knowledge.backend,
            "mask": cfg.mask.backend,
        },
    }
    tags = [f"category:{category}", f"anomaly_type:{anomaly_type}", f"policy:{cfg.policy.kind}"]
    return f"anomaly-agent {category}/{anomaly_type}", tags, metadata


# ------------------------------------------------------------------------------------ traced runs


def label_graph_run(config: RunnableConfig, name: str, tags: list[str], metadata: dict[str, Any]) -> None:
    """Rename the graph's traced run (the parent of the calling node's run) and add tags and metadata.

    Why here and not at invoke: the task (category, type, seed) is only known once the graph reads its
    input, and a LangGraph server starts the graph's run itself; the name is sent with the run's final
    update.
    """
    manager = get_callback_manager_for_config(config)
    for handler in manager.handlers:
        if isinstance(handler, LangChainTracer):
            node_run = handler.run_map.get(str(manager.parent_run_id))
            graph_run = handler.run_map.get(str(node_run.parent_run_id)) if node_run and node_run.parent_run_id else None
            if graph_run is not None:
                graph_run.name = name
                graph_run.tags = sorted(set(graph_run.tags or []) | set(tags))
                graph_run.extra.setdefault("metadata", {}).update(metadata)


def _manager(config: RunnableConfig, tags: list[str], metadata: dict[str, Any]) -> Any:
    """The callback manager of the calling node, adding `tags` and `metadata` to the runs it starts only."""
    manager = get_callback_manager_for_config(config)
    manager.add_tags(tags, inherit=False)
    manager.add_metadata(metadata, inherit=False)
    return manager


@contextmanager
def tool_run(config: RunnableConfig, name: str, args: dict[str, Any], tags: list[str],
             metadata: dict[str, Any]) -> Iterator[CallbackManagerForToolRun]:
    """A ``tool`` run around a tool call; the caller ends it with ``run.on_tool_end(observation)``."""
    run = _manager(config, tags, metadata).on_tool_start({"name": name}, str(args), name=name, inputs=dict(args))
    try:
        yield run
    except BaseException as error:
        run.on_tool_error(error)
        raise


def traced_policy_call(config: RunnableConfig, cfg: Configuration, messages: list[BaseMessage], decide: Callable[[], Any],
                       tags: list[str], metadata: dict[str, Any]) -> Any:
    """`decide()` as an ``llm`` run when a model is asked (openai, local); the scripted policy is not traced apart."""
    if cfg.policy.kind == "scripted":
        return decide()
    model = cfg.policy.model or cfg.policy.kind
    llm_metadata = {**metadata, "ls_provider": cfg.policy.kind, "ls_model_name": model, "ls_temperature": cfg.policy.temperature}
    (run,) = _manager(config, tags, llm_metadata).on_chat_model_start(
        {"name": model}, [messages], name=f"policy {model}",
        invocation_params={"model": model, "temperature": cfg.policy.temperature, "max_tokens": cfg.policy.max_tokens},
    )
    try:
        message = decide()
    except BaseException as error:
        run.on_llm_error(error)
        raise
    run.on_llm_end(LLMResult(generations=[[ChatGeneration(message=message)]]))
    return message

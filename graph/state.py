"""The agent's state: references and small records, never pixels (DESIGN §3).

Images live in a content-addressed store under the run directory; the state keeps their ids, numbered
in the conversation from 1 (the normal image) so a policy can name them. Every field is JSON-friendly
so checkpointers and the LangGraph server can persist it.
"""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages


class AgentInput(TypedDict, total=False):
    """What a caller gives: the normal image (file path or data URL), its category and the defect type."""

    image: str
    category: str
    anomaly_type: str
    seed: int
    run_dir: str


class AgentOutput(TypedDict, total=False):
    """What a run returns: its status and where the results are."""

    status: str
    result: dict[str, Any]
    messages: list[AnyMessage]


class AgentState(TypedDict, total=False):
    """The full state a run carries between nodes."""

    # Inputs
    image: str
    category: str
    anomaly_type: str
    seed: int
    run_dir: str

    # Facts about the task, from the knowledge catalog
    subject: str
    is_texture: bool
    default_shape: str
    region: str | None
    jpeg_quality: int | None  # the normal image's JPEG quality when it was a JPEG (IG's output goes through it)
    jpeg_subsampling: int

    # Conversation; `next` and `pending_call` carry the policy's routed call to its tool node
    next: str
    pending_call: dict[str, Any]
    messages: Annotated[list[AnyMessage], add_messages]

    # Artefacts, by conversation image number (as a string key: JSON objects need string keys)
    images: dict[str, str]
    generations: dict[str, dict[str, Any]]
    evaluations: dict[str, dict[str, Any]]
    masks: dict[str, dict[str, Any]]
    prompt: str
    knowledge: list[dict[str, Any]]

    # Budget and outcome
    steps: int
    image_gens: int
    calls: list[str]
    timings: dict[str, float]
    status: str
    error: str
    result: dict[str, Any]

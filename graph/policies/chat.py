"""What LLM policies share: the run as the OpenAI chat messages a policy is sent.

The other direction, a completion parsed back into an AIMessage, is `graph.inference.hermes`, shared
with the local engine's server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, AnyMessage, convert_to_openai_messages

from graph.configuration import Configuration
from graph.inference.hermes import content_text
from graph.state import AgentState
from graph.tool_calls import tool_schemas

_GENERATED = re.compile(r"Generated <image (\d+)>")


# ------------------------------------------------------------------------------------------ messages


def to_openai_messages(messages: list[AnyMessage]) -> list[dict[str, Any]]:
    """LangChain messages in OpenAI chat format, keeping calls the graph could not parse.

    `convert_to_openai_messages` drops ``invalid_tool_calls``, which would leave the error observation
    that answers them without its call (OpenAI-compatible servers reject such a conversation). They are
    sent back as calls with their raw argument text, so the model sees what it wrote and why it failed.
    """
    converted = convert_to_openai_messages(list(messages))
    for message, entry in zip(messages, converted):
        if isinstance(message, AIMessage) and message.invalid_tool_calls:
            calls = list(entry.get("tool_calls") or [])
            for bad in message.invalid_tool_calls:
                args = bad.get("args")
                calls.append(
                    {
                        "type": "function",
                        "id": bad.get("id") or "none",
                        "function": {
                            "name": bad.get("name") or "invalid",
                            "arguments": args if isinstance(args, str) else json.dumps(args or {}),
                        },
                    }
                )
            entry["tool_calls"] = calls
        if entry.get("role") == "assistant" and entry.get("content") is None:
            entry["content"] = ""
    return converted


def chat_messages(state: AgentState, config: Configuration) -> list[dict[str, Any]]:
    """The run so far as the OpenAI chat messages a policy is sent.

    A text-only policy sees ``<image N>`` placeholders (already in the prompts and observations). With
    ``config.policy.vision`` the first user message also carries the normal image as a data URL, and with
    ``show_generated_images`` each generated image follows the tool result that announced it.
    """
    messages = to_openai_messages(state.get("messages", []))
    if not config.policy.vision:
        return messages
    images = state.get("images") or {}
    out: list[dict[str, Any]] = []
    pending: list[int] = []
    first_user_done = False
    for entry in messages:
        if entry["role"] != "tool" and pending:
            out.append(_image_message(state, pending))
            pending = []
        if entry["role"] == "user" and not first_user_done and "1" in images:
            first_user_done = True
            entry = {**entry, "content": [{"type": "text", "text": content_text(entry["content"])}, _image_part(state, 1)]}
        out.append(entry)
        if entry["role"] == "tool" and config.policy.show_generated_images:
            match = _GENERATED.search(content_text(entry.get("content")))
            if match and match.group(1) in images:
                pending.append(int(match.group(1)))
    if pending:
        out.append(_image_message(state, pending))
    return out


def _image_part(state: AgentState, number: int) -> dict[str, Any]:
    from tools.image_store import ImageStore
    from tools.imaging import encode_data_url

    image = ImageStore(Path(state["run_dir"])).get(state["images"][str(number)])
    return {"type": "image_url", "image_url": {"url": encode_data_url(image)}}


def _image_message(state: AgentState, numbers: list[int]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    for number in numbers:
        parts += [{"type": "text", "text": f"<image {number}>:"}, _image_part(state, number)]
    return {"role": "user", "content": parts}


def turn_seed(state: AgentState) -> int:
    """A sampling seed per (run seed, turn), so rerunning a run repeats its samples and turns differ."""
    return (int(state.get("seed", 0)) * 1_000_003 + len(state.get("messages", [])) * 7919) % 2**31


def tools_for_policy() -> list[dict[str, Any]]:
    """The tool schemas sent with every request (the same ones the graph validates against)."""
    return tool_schemas()

"""Tool calls in text, Hermes style: the ``<tools>`` system block, a call rendered as text, and a completion
parsed back into an AIMessage.

Why one module for both directions: the local policy, the OpenAI-compatible client and the
`serve-policy` server must agree on how tool calls look in text. Models trained on Hermes-style data
(Qwen, SmolLM, Llama finetunes) write ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``;
servers with a tool parser return native ``tool_calls``; small untrained models write anything. The
parser accepts all of these, keeps the reasoning as the message content, and turns a call it cannot
read into an ``invalid_tool_calls`` entry so the graph answers it with an error observation (the policy
can then correct itself) instead of silently treating it as a final answer.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from langchain_core.messages import AIMessage

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)

#: The Hermes function-calling preamble (as in Qwen2.5's and NousResearch's chat templates), for chat
#: templates that ignore ``tools``: the schemas go into the system prompt in the format those models
#: were trained on.
HERMES_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


def content_text(content: Any) -> str:
    """The text of a message content (a string, or a list of parts with images as placeholders)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif part.get("type") == "text":
            texts.append(part.get("text", ""))
        else:
            texts.append("<image>")
    return "\n".join(texts)


def flatten_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with every content as a string (images become ``<image>``), for text-only models."""
    return [{**m, "content": content_text(m.get("content"))} for m in messages]


def hermes_system_block(tools: list[dict[str, Any]]) -> str:
    """The tools as a Hermes ``<tools></tools>`` system-prompt block."""
    return HERMES_TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def render_tool_call(name: str, arguments: Any) -> str:
    """One call in the Hermes text format (how an assistant turn with a call looks in a text-only history)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


# ------------------------------------------------------------------------------------------- parsing


def parse_completion(
    content: str | None,
    native_calls: list[Any] | None = None,
    *,
    reasoning: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> AIMessage:
    """An assistant reply as an AIMessage with parsed `tool_calls` and unparseable `invalid_tool_calls`.

    Args:
        content: The reply text; may hold ``<tool_call>`` blocks or a bare JSON call.
        native_calls: The server's parsed tool calls (OpenAI objects or dicts), if it has a parser.
        reasoning: Separate reasoning text some servers return; kept in front of the content.
        metadata: Stored as the message's ``response_metadata`` (token ids, finish reason...).

    Returns:
        The message. Native calls win; text calls are read only when the server parsed none.
    """
    text = content or ""
    tool_calls: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    if native_calls:
        for call in native_calls:
            name, arguments, call_id = _native_parts(call)
            _add_call(name, arguments, call_id, tool_calls, invalid)
        thought = strip_tool_calls(text)
    else:
        thought, found = extract_text_calls(text)
        for body in found:
            name, arguments, error = _read_call_body(body)
            if error:
                invalid.append(_invalid(name, body, error))
            else:
                _add_call(name, arguments, None, tool_calls, invalid)
    if reasoning and reasoning.strip():
        thought = f"{reasoning.strip()}\n\n{thought}".strip()
    return AIMessage(
        content=thought,
        tool_calls=tool_calls,
        invalid_tool_calls=invalid,
        response_metadata=metadata or {},
    )


def extract_text_calls(text: str) -> tuple[str, list[str]]:
    """Split a reply into its thought and the bodies of the tool calls it writes.

    ``<tool_call>`` blocks are taken first (an unclosed last block runs to the end: generation may stop
    at the closing tag or at the token limit). Without any, a bare JSON object with a ``name`` and
    ``arguments`` (or ``parameters``) is a call too, as some models answer that way.
    """
    if TOOL_CALL_OPEN in text:
        bodies = [m.group(1).strip() for m in _TOOL_CALL_BLOCK.finditer(text)]
        return strip_tool_calls(text), bodies
    span = _bare_json_call(text)
    if span is None:
        return text.strip(), []
    start, end = span
    return (text[:start] + text[end:]).replace("```json", "").replace("```", "").strip(), [text[start:end]]


def strip_tool_calls(text: str) -> str:
    """The text without its ``<tool_call>`` blocks."""
    return _TOOL_CALL_BLOCK.sub("", text).replace(TOOL_CALL_CLOSE, "").strip()


def _bare_json_call(text: str) -> tuple[int, int] | None:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str) and (
            "arguments" in value or "parameters" in value
        ):
            return match.start(), end
    return None


def _read_call_body(body: str) -> tuple[str, Any, str | None]:
    """(name, arguments, error) of one call's JSON text."""
    fenced = _FENCE.match(body.strip())
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return _guess_name(body), None, f"the tool call is not valid JSON ({error.msg} at char {error.pos})"
    if not isinstance(value, dict):
        return "", None, "the tool call must be a JSON object with 'name' and 'arguments'"
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return "", None, "the tool call has no 'name'"
    arguments = value.get("arguments", value.get("parameters", {}))
    return name, arguments, None


def _guess_name(body: str) -> str:
    match = re.search(r'"name"\s*:\s*"([^"]+)"', body)
    return match.group(1) if match else ""


def _native_parts(call: Any) -> tuple[str, Any, str | None]:
    if isinstance(call, dict):
        function = call.get("function") or {}
        return function.get("name") or "", function.get("arguments"), call.get("id")
    function = getattr(call, "function", None)
    return getattr(function, "name", "") or "", getattr(function, "arguments", None), getattr(call, "id", None)


def _add_call(name: str, arguments: Any, call_id: str | None, calls: list[dict[str, Any]], invalid: list[dict[str, Any]]) -> None:
    """Append a call whose arguments decode to a JSON object; anything else becomes an invalid call."""
    raw = arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            invalid.append(_invalid(name, raw, f"arguments are not valid JSON ({error.msg})", call_id))
            return
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        invalid.append(_invalid(name, json.dumps(raw), "arguments must be a JSON object", call_id))
        return
    calls.append({"name": name, "args": arguments, "id": call_id or _new_id(), "type": "tool_call"})


def _invalid(name: str, raw: Any, error: str, call_id: str | None = None) -> dict[str, Any]:
    return {
        "name": name or None,
        "args": raw if isinstance(raw, str) else json.dumps(raw),
        "id": call_id or _new_id(),
        "error": error,
        "type": "invalid_tool_call",
    }


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:12]}"

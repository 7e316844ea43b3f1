"""The five tools as the policy sees them: argument models, JSON schemas, and call validation.

Why here and not in `tools/`: these are the agent's words for the tools (what an LLM may call and
with which arguments); `tools/` holds what the tools compute. The JSON schemas are generated from the
pydantic models, so the schema an LLM is shown and the validation its calls meet cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Args(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PromptGenArgs(_Args):
    """Write a local editing instruction for the defect (use first; again with feedback to rework it)."""

    feedback: str = Field(default="", description="What to change, e.g. a QE review; empty for a first draft.")


class ImageGenArgs(_Args):
    """Edit an image to add the defect described by the instruction; returns a new image number."""

    prompt: str = Field(description="The editing instruction.", min_length=3)
    image: int = Field(default=1, ge=1, description="Number of the image to edit; 1 is the normal image.")


class QualityEvalArgs(_Args):
    """Score a generated image: location and realism, 0-5 each, with a review naming fixes."""

    image: int = Field(ge=2, description="Number of the generated image to evaluate.")


class KnowledgeRetrievalArgs(_Args):
    """Look up physical descriptions of the defect: appearance, cause, where it occurs."""

    query: str = Field(default="", description="Optional search text; default: the defect type.")


class MaskGenArgs(_Args):
    """Make the pixel mask of the defect in a generated image (last, after a passing evaluation)."""

    image: int = Field(ge=2, description="Number of the generated image to mask.")


TOOL_ARGS: dict[str, type[_Args]] = {
    "prompt_gen": PromptGenArgs,
    "image_gen": ImageGenArgs,
    "quality_eval": QualityEvalArgs,
    "knowledge_retrieval": KnowledgeRetrievalArgs,
    "mask_gen": MaskGenArgs,
}
TOOL_NAMES: tuple[str, ...] = tuple(TOOL_ARGS)


def tool_schemas() -> list[dict[str, Any]]:
    """The tools in OpenAI function-calling format, as sent to chat endpoints and saved in trajectories."""
    schemas = []
    for name, model in TOOL_ARGS.items():
        parameters = model.model_json_schema()
        parameters.pop("title", None)
        for prop in parameters.get("properties", {}).values():
            prop.pop("title", None)
        schemas.append(
            {
                "type": "function",
                "function": {"name": name, "description": (model.__doc__ or "").strip(), "parameters": parameters},
            }
        )
    return schemas


@dataclass(frozen=True)
class ValidCall:
    name: str
    args: _Args
    call_id: str


@dataclass(frozen=True)
class InvalidCall:
    name: str
    error: str
    call_id: str


def validate_call(name: str, arguments: Any, call_id: str) -> ValidCall | InvalidCall:
    """Check one tool call; never raises. Arguments may be a dict or a JSON string (as some servers send).

    Returns:
        A `ValidCall` with parsed arguments, or an `InvalidCall` whose error is shown to the policy.
    """
    if name not in TOOL_ARGS:
        return InvalidCall(name, f"unknown tool '{name}'; the tools are: {', '.join(TOOL_NAMES)}", call_id)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return InvalidCall(name, f"arguments of {name} are not valid JSON: {error.msg}", call_id)
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return InvalidCall(name, f"arguments of {name} must be a JSON object", call_id)
    try:
        return ValidCall(name, TOOL_ARGS[name].model_validate(arguments), call_id)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "arguments"
        return InvalidCall(name, f"invalid arguments for {name}: '{field}' {first['msg'].lower()}", call_id)

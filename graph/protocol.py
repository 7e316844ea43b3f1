"""The expert protocol (DESIGN §5-6) and how to read a conversation against it: the one place for both.

Why one module: the scripted expert follows the protocol, the graph picks its final image by it, the
evaluation measures it, and GRPO's rewards and update guard train towards it. Each of them asks the
same questions (which image is best, is the budget spent, which calls ran, was a turn accepted), so a
change to the protocol is a change here.

Error observations are marked on the tool message itself (``ToolMessage.status == "error"``), not
recognised by their text, so a prompt wording change cannot change what counts as an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from langchain_core.messages import AIMessage, AnyMessage, ToolMessage

from graph.tool_calls import ValidCall, validate_call

#: A continuation after a failed image needs image_gen + quality_eval + mask_gen.
STEPS_FOR_RETRY = 3
#: The same continuation with a knowledge_retrieval first.
STEPS_FOR_KNOWLEDGE = 4

#: How the graph's refusal of an image_gen over the image budget begins.
BUDGET_REFUSAL = "the image_gen budget is used up"

#: The move "tool" of a final answer (a turn without a call), the only move the protocol allows after the mask.
FINAL_ANSWER = "final_answer"

#: (previous call, the only move the protocol allows next); None: the run's first call.
FORCED_MOVES: frozenset[tuple[str | None, str]] = frozenset({
    (None, "prompt_gen"), ("prompt_gen", "image_gen"), ("image_gen", "quality_eval"), ("quality_eval", "mask_gen"),
    ("mask_gen", FINAL_ANSWER),
})

#: Tools that answer the same arguments the same way: calling one again with them only spends a step.
DETERMINISTIC_TOOLS = ("quality_eval", "mask_gen", "knowledge_retrieval")


@dataclass(frozen=True)
class ExecutedCall:
    """A tool call that reached its tool and came back without an error observation."""

    name: str
    args: dict[str, Any]
    steps_before: int
    image_gens_before: int
    turn: int = -1  # the index of the assistant message that made it, among the run's assistant messages


@dataclass
class RunMetrics:
    """How one finished run drove the agent (see `measure_run`)."""

    status: str
    turns: int
    valid_turns: int
    protocol: bool
    masked_by_policy: bool
    score: float
    steps: int
    seconds: float
    error: str | None = None


# --------------------------------------------------------------------------------------------- the rules


def image_score(evaluation: Mapping[str, Any]) -> float:
    """An evaluation's score: location + quality (0-10)."""
    return float(evaluation["location"]) + float(evaluation["quality"])


def best_image(evaluations: Mapping[str, Mapping[str, Any]], generated: Iterable[int]) -> int | None:
    """The best image: the highest-scored evaluated one (ties to the later), else the latest generated, else None."""
    if evaluations:
        return int(max(evaluations, key=lambda k: (image_score(evaluations[k]), int(k))))
    numbers = list(generated)
    return max(numbers) if numbers else None


def retry_fits(steps_used: int, image_gens_used: int, max_steps: int, max_image_gens: int) -> bool:
    """Whether another attempt (image_gen, quality_eval, mask_gen) still fits both budgets."""
    return image_gens_used < max_image_gens and max_steps - steps_used >= STEPS_FOR_RETRY


def error_message(content: str, tool_call_id: str, name: str) -> ToolMessage:
    """A tool answer that is an error observation (marked with ``status="error"``)."""
    return ToolMessage(content=content, tool_call_id=tool_call_id, name=name, status="error")


def is_error(message: AnyMessage) -> bool:
    """Whether a tool answer is an error observation (`error_message`)."""
    return isinstance(message, ToolMessage) and message.status == "error"


def is_budget_refusal(message: AnyMessage) -> bool:
    """Whether a tool answer is the graph's refusal of an image_gen over budget."""
    return is_error(message) and BUDGET_REFUSAL in message_text(message)


# ------------------------------------------------------------------------------------ reading a conversation


def message_text(message: AnyMessage) -> str:
    """A message's text, whether its content is a string or a list of parts."""
    content = message.content
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)


def turn_is_valid(message: AIMessage, after_mask: bool = True) -> bool:
    """Exactly one tool call that validates, or a proper final answer.

    A final answer is non-empty text with no call-like text that failed to parse, given after the
    policy's mask_gen ran (the only point where the protocol ends).

    Args:
        message: The assistant turn.
        after_mask: Whether the policy's mask_gen had run before this turn; only then may it answer.
    """
    if message.invalid_tool_calls:
        return False
    if not message.tool_calls:
        return after_mask and bool(message_text(message).strip())
    if len(message.tool_calls) != 1:
        return False
    call = message.tool_calls[0]
    return isinstance(validate_call(call["name"], call.get("args"), call.get("id") or ""), ValidCall)


def valid_turns(messages: list[AnyMessage]) -> list[bool]:
    """`turn_is_valid` of each assistant turn in order, answers counted valid only after a successful mask_gen."""
    flags: list[bool] = []
    masked = False
    for message in messages:
        if isinstance(message, ToolMessage):
            masked = masked or (message.name == "mask_gen" and not is_error(message))
        elif isinstance(message, AIMessage):
            flags.append(turn_is_valid(message, after_mask=masked))
    return flags


def turns_accepted(messages: list[AnyMessage]) -> list[bool]:
    """For each assistant turn in order: whether the graph took it (`turn_is_valid`, and its call not answered
    with an error, e.g. an image that does not exist or a budget refusal).

    Why stricter than `turn_is_valid`: a call can match its schema and still be one the run cannot use; the
    turn-level credit of GRPO pushes down exactly the turns the graph turned away.
    """
    answers = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    assistant = [m for m in messages if isinstance(m, AIMessage)]
    accepted: list[bool] = []
    for message, ok in zip(assistant, valid_turns(messages)):
        if ok and message.tool_calls:
            answer = answers.get(message.tool_calls[0].get("id") or "")
            ok = answer is not None and not is_error(answer)
        accepted.append(ok)
    return accepted


def executed_calls(messages: list[AnyMessage]) -> list[ExecutedCall]:
    """The tool calls that ran, in order, with the budget used before each."""
    answers = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    calls: list[ExecutedCall] = []
    steps = gens = 0
    turn = -1
    for message in messages:
        if not isinstance(message, AIMessage):
            continue
        turn += 1
        if not (message.tool_calls or message.invalid_tool_calls):
            continue
        if message.tool_calls:  # the policy node runs the first parsed call (if it validates)
            first = message.tool_calls[0]
            answer = answers.get(first["id"])
            checked = validate_call(first["name"], first.get("args"), first.get("id") or "")
            if isinstance(checked, ValidCall) and answer is not None and not is_error(answer):
                calls.append(ExecutedCall(checked.name, checked.args.model_dump(), steps, gens, turn))
                gens += checked.name == "image_gen"
        steps += 1
    return calls


def repeated_call_turns(messages: list[AnyMessage]) -> list[bool]:
    """For each assistant message, whether the call it ran repeats an earlier executed call of a tool that
    answers the same arguments the same way (`DETERMINISTIC_TOOLS`)."""
    flags = [False] * sum(isinstance(m, AIMessage) for m in messages)
    seen: set[str] = set()
    for call in executed_calls(messages):
        if call.name in DETERMINISTIC_TOOLS:
            key = call.name + json.dumps(call.args, sort_keys=True)
            flags[call.turn] = key in seen
            seen.add(key)
    return flags


def follows_protocol(
    calls: list[ExecutedCall], evaluations: dict[str, dict[str, Any]], max_steps: int, max_image_gens: int
) -> bool:
    """Whether a run's executed calls follow the protocol.

    Precisely, all of:
      1. at least one call ran, and the first was prompt_gen;
      2. each knowledge_retrieval came after a quality_eval, and the latest quality_eval before it failed;
      3. nothing ran after the first mask_gen (MG last);
      4. mask_gen's image had passed an earlier quality_eval - unless no further attempt fitted the budget
         at that point (`retry_fits`), in which case it must be the `best_image` evaluated so far.
    Invalid calls and calls answered with an error are not counted here (`valid_turns` measures them).
    """
    if not calls or calls[0].name != "prompt_gen":
        return False
    last_eval_passed: bool | None = None
    evaluated: dict[str, dict[str, Any]] = {}
    generated: list[int] = []
    image_number = 1
    for index, call in enumerate(calls):
        if call.name == "image_gen":
            image_number += 1
            generated.append(image_number)
        elif call.name == "quality_eval":
            number = int(call.args["image"])
            evaluation = evaluations.get(str(number))
            if evaluation is None:
                continue
            last_eval_passed = bool(evaluation["passed"])
            evaluated[str(number)] = evaluation
        elif call.name == "knowledge_retrieval":
            if last_eval_passed is not False:
                return False
        elif call.name == "mask_gen":
            if index != len(calls) - 1:
                return False
            number = int(call.args["image"])
            if evaluated.get(str(number), {}).get("passed"):
                continue
            if retry_fits(call.steps_before, call.image_gens_before, max_steps, max_image_gens):
                return False
            best = best_image(evaluated, generated)
            if number != (best if best is not None else -1):
                return False
    return True


def measure_run(output: dict[str, Any], record: dict[str, Any], max_steps: int, max_image_gens: int,
                seconds: float) -> RunMetrics:
    """The metrics of one finished run from the graph's output and its trajectory record."""
    messages = output.get("messages") or []
    result = output.get("result") or {}
    valid = valid_turns(messages)
    return RunMetrics(
        status=str(output.get("status")),
        turns=len(valid),
        valid_turns=sum(valid),
        protocol=follows_protocol(executed_calls(messages), record.get("evaluations") or {}, max_steps, max_image_gens),
        masked_by_policy=result.get("mask_by") == "policy",
        score=float(result.get("score") or 0.0),
        steps=int(result.get("steps") or 0),
        seconds=seconds,
        error=result.get("error"),
    )

"""The scripted expert policy: DESIGN §5's rules, emitted as OpenAI-style tool calls.

Why it writes thoughts and tool calls like an LLM: its traces are the teacher data for SFT, so each
message must have the shape an LLM policy's would (a short reason, then one call). It decides from the
same facts its observations show: the last tool called, the last evaluation and its fixes, the
knowledge retrieved, and the budget left.

The rules: prompt_gen -> image_gen -> quality_eval; on a failed evaluation retrieve knowledge once (if
the budget allows), then rewrite the instruction with the review's fixes and the knowledge's typical
look, and generate again; mask_gen on the first passing image, or on the best one when the image
budget runs out; then a final answer.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage

from graph.configuration import Configuration
from graph.protocol import STEPS_FOR_KNOWLEDGE, best_image, retry_fits
from graph.state import AgentState
from tools.types import KnowledgeEntry
from tools.vocabulary import Fix, apply_fixes, parse_instruction, render_instruction


class ScriptedPolicy:
    """Deterministic expert; the teacher for trajectories."""

    def decide(self, state: AgentState, config: Configuration) -> AIMessage:
        calls = state.get("calls", [])
        steps_left = config.budget.max_steps - state.get("steps", 0)
        latest = _latest_image(state)
        last = calls[-1] if calls else None

        if last == "mask_gen":
            number = max(int(k) for k in state.get("masks", {}) or {"0": None})
            return _answer(f"Image {number} has the defect and its mask. Done.")
        if latest is not None and steps_left <= 1:
            best = _best_image(state)
            return _call("mask_gen", {"image": best}, len(calls), f"One tool call left: mask image {best}, the best so far.")
        if last is None:
            return _call("prompt_gen", {}, len(calls), "First, write an editing instruction for the defect.")
        if last == "prompt_gen":
            return _call(
                "image_gen",
                {"prompt": state["prompt"], "image": 1},
                len(calls),
                "Apply the instruction to the normal image.",
            )
        if last == "image_gen" and latest is not None:
            return _call("quality_eval", {"image": latest}, len(calls), f"Check whether image {latest} is good.")

        evaluation = (state.get("evaluations") or {}).get(str(latest)) if latest is not None else None
        if evaluation is None:
            # Nothing left to evaluate (e.g. a failed tool call): start again from a fresh instruction.
            return _call("prompt_gen", {}, len(calls), "Write a fresh instruction.")
        if evaluation["passed"]:
            return _call("mask_gen", {"image": latest}, len(calls), f"Image {latest} passed; make its mask.")
        if not retry_fits(state.get("steps", 0), state.get("image_gens", 0), config.budget.max_steps, config.budget.max_image_gens):
            best = _best_image(state)
            return _call(
                "mask_gen",
                {"image": best},
                len(calls),
                f"Image {latest} failed and the budget is spent; mask image {best}, the best scored.",
            )
        if "knowledge_retrieval" not in calls and steps_left >= STEPS_FOR_KNOWLEDGE:
            return _call(
                "knowledge_retrieval",
                {"query": f"{state['anomaly_type']} on {state['category']}"},
                len(calls),
                f"Image {latest} failed ({_short_review(evaluation)}). Look up how this defect really looks.",
            )
        prompt = refine_prompt(state, evaluation)
        return _call(
            "image_gen",
            {"prompt": prompt, "image": 1},
            len(calls),
            f"Rewrite the instruction with the review's fixes ({_short_review(evaluation)}) and generate again.",
        )


def refine_prompt(state: AgentState, evaluation: dict[str, Any]) -> str:
    """The current instruction with the knowledge's typical look and the review's fixes applied."""
    spec = parse_instruction(state["prompt"])
    knowledge = [KnowledgeEntry.model_validate(k) for k in state.get("knowledge") or []]
    exact = [k for k in knowledge if k.match == "exact"]
    if exact and state.get("calls", [])[-1:] == ["knowledge_retrieval"]:
        typical = exact[0].typical
        spec = apply_fixes(
            spec,
            [Fix(attribute=a, value=typical[a]) for a in ("colour", "softness", "position") if a in typical]
            + ([Fix(attribute="region", value=exact[0].region)] if exact[0].region else []),
        )
    spec = apply_fixes(spec, [Fix.model_validate(f) for f in evaluation.get("fixes", [])])
    subject = state.get("subject") or "the object"
    return render_instruction(spec, subject=subject)


def _latest_image(state: AgentState) -> int | None:
    generated = [int(k) for k in (state.get("generations") or {})]
    return max(generated) if generated else None


def _best_image(state: AgentState) -> int:
    best = best_image(state.get("evaluations") or {}, map(int, state.get("generations") or {}))
    return best if best is not None else 1


def _short_review(evaluation: dict[str, Any]) -> str:
    return evaluation["review"].split(".")[0].strip()


def _call(name: str, args: dict[str, Any], index: int, thought: str) -> AIMessage:
    return AIMessage(content=thought, tool_calls=[{"name": name, "args": args, "id": f"call_{index + 1}", "type": "tool_call"}])


def _answer(text: str) -> AIMessage:
    return AIMessage(content=text)

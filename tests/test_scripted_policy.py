"""The scripted expert's decisions on hand-written states: protocol order, knowledge once, refinement."""

from __future__ import annotations

from graph.configuration import Configuration
from graph.policies.scripted import ScriptedPolicy
from tools.vocabulary import parse_instruction

CFG = Configuration()
PROMPT = "Add one small dark scratch with sharp edges, low contrast, in the top-left of the metal nut."
FAILED = {
    "location": 4.5,
    "quality": 1.5,
    "passed": False,
    "review": "Too faint: the defect barely stands out. Fixes: contrast=medium",
    "fixes": [{"attribute": "contrast", "value": "medium", "reason": ""}],
}
PASSED = {**FAILED, "quality": 4.5, "passed": True, "review": "Good.", "fixes": []}


def _state(calls, evaluations=None, generations=None, **extra):
    return {
        "category": "metal_nut",
        "anomaly_type": "scratch",
        "subject": "the metal nut",
        "prompt": PROMPT,
        "calls": calls,
        "steps": len(calls),
        "image_gens": calls.count("image_gen"),
        "generations": generations or {str(i + 2): {"prompt": PROMPT} for i in range(calls.count("image_gen"))},
        "evaluations": evaluations or {},
        "masks": {},
        "knowledge": [],
        **extra,
    }


def _next(state):
    message = ScriptedPolicy().decide(state, CFG)
    return (message.tool_calls[0]["name"], message.tool_calls[0]["args"]) if message.tool_calls else ("answer", message.content)


def test_protocol_starts_with_prompt_then_image_then_evaluation():
    assert _next(_state([]))[0] == "prompt_gen"
    assert _next(_state(["prompt_gen"])) == ("image_gen", {"prompt": PROMPT, "image": 1})
    assert _next(_state(["prompt_gen", "image_gen"])) == ("quality_eval", {"image": 2})


def test_passing_image_is_masked_then_answered():
    calls = ["prompt_gen", "image_gen", "quality_eval"]
    assert _next(_state(calls, {"2": PASSED})) == ("mask_gen", {"image": 2})
    done = _state([*calls, "mask_gen"], {"2": PASSED}, masks={"2": {}})
    assert _next(done)[0] == "answer"


def test_first_failure_retrieves_knowledge_once_then_refines_with_the_review_fixes():
    calls = ["prompt_gen", "image_gen", "quality_eval"]
    assert _next(_state(calls, {"2": FAILED}))[0] == "knowledge_retrieval"
    name, args = _next(_state([*calls, "knowledge_retrieval"], {"2": FAILED}))
    assert name == "image_gen"
    assert parse_instruction(args["prompt"]).contrast == "medium"
    second_failure = _state([*calls, "knowledge_retrieval", "image_gen", "quality_eval"], {"2": FAILED, "3": FAILED})
    assert _next(second_failure)[0] == "image_gen"


def test_image_budget_spent_masks_the_best_scored_image():
    better = {**FAILED, "quality": 2.5}
    calls = ["prompt_gen", "image_gen", "quality_eval", "knowledge_retrieval", "image_gen", "quality_eval", "image_gen", "quality_eval"]
    state = _state(calls, {"2": FAILED, "3": better, "4": FAILED})
    assert _next(state) == ("mask_gen", {"image": 3})


def test_last_step_of_the_budget_goes_to_the_mask():
    cfg_steps = CFG.budget.max_steps
    calls = ["prompt_gen"] + ["image_gen", "quality_eval"] * ((cfg_steps - 2) // 2)
    state = _state(calls[: cfg_steps - 1], {"2": FAILED})
    assert _next(state)[0] == "mask_gen"

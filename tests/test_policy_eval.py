"""`anomaly-agent eval policy`: the measures, checked on hand-made call sequences and on the scripted expert."""

from __future__ import annotations

import re

import pytest
from langchain_core.messages import AIMessage, ToolMessage

from graph.protocol import ExecutedCall, error_message, executed_calls, follows_protocol, turn_is_valid
from graph.tasks import make_tasks
from anomaly_agent_cli import main

pytestmark = pytest.mark.timeout(120)

PASS = {"location": 4.0, "quality": 4.0, "passed": True}
FAIL = {"location": 1.0, "quality": 2.0, "passed": False}


def _calls(*names_args: tuple[str, dict], steps0: int = 0) -> list[ExecutedCall]:
    calls, gens = [], 0
    for i, (name, args) in enumerate(names_args):
        calls.append(ExecutedCall(name, args, steps0 + i, gens))
        gens += name == "image_gen"
    return calls


PG, IG = ("prompt_gen", {}), ("image_gen", {"prompt": "x", "image": 1})


def test_expert_sequences_follow_the_protocol():
    assert follows_protocol(_calls(PG, IG, ("quality_eval", {"image": 2}), ("mask_gen", {"image": 2})), {"2": PASS}, 10, 3)
    retry = _calls(PG, IG, ("quality_eval", {"image": 2}), ("knowledge_retrieval", {}), IG, ("quality_eval", {"image": 3}),
                   ("mask_gen", {"image": 3}))
    assert follows_protocol(retry, {"2": FAIL, "3": PASS}, 10, 3)


@pytest.mark.parametrize(
    ("calls", "evaluations"),
    [
        (_calls(IG, ("quality_eval", {"image": 2})), {"2": PASS}),  # not PG first
        (_calls(PG, ("knowledge_retrieval", {}), IG), {}),  # KR before any QE
        (_calls(PG, IG, ("quality_eval", {"image": 2}), ("knowledge_retrieval", {})), {"2": PASS}),  # KR after a pass
        (_calls(PG, IG, ("quality_eval", {"image": 2}), ("mask_gen", {"image": 2}), IG), {"2": PASS}),  # MG not last
        (_calls(PG, IG, ("quality_eval", {"image": 2}), ("mask_gen", {"image": 2})), {"2": FAIL}),  # MG on a fail, budget left
        ([], {}),
    ],
)
def test_violations_are_caught(calls, evaluations):
    assert not follows_protocol(calls, evaluations, 10, 3)


def test_masking_the_best_failed_image_is_allowed_once_the_budget_is_spent():
    calls = _calls(PG, IG, ("quality_eval", {"image": 2}), IG, ("quality_eval", {"image": 3}), ("mask_gen", {"image": 2}))
    evaluations = {"2": {**FAIL, "quality": 2.5}, "3": FAIL}
    assert follows_protocol(calls, evaluations, 10, 2)
    assert not follows_protocol(calls, evaluations, 10, 3)  # another image_gen was still allowed
    calls[-1] = ExecutedCall("mask_gen", {"image": 3}, 5, 2)
    assert not follows_protocol(calls, evaluations, 10, 2)  # not the best one


def test_turn_validity():
    call = {"name": "quality_eval", "args": {"image": 2}, "id": "a", "type": "tool_call"}
    assert turn_is_valid(AIMessage("check", tool_calls=[call]))
    assert not turn_is_valid(AIMessage("", tool_calls=[{**call, "args": {"image": 0}}]))
    assert not turn_is_valid(AIMessage("", tool_calls=[call, {**call, "id": "b"}]))
    assert not turn_is_valid(AIMessage("", invalid_tool_calls=[{"name": "x", "args": "{", "id": "c", "error": "e",
                                                                 "type": "invalid_tool_call"}]))
    assert turn_is_valid(AIMessage("Done."), after_mask=True)
    assert not turn_is_valid(AIMessage("Here is a nice nut."), after_mask=False)


def test_calls_answered_with_errors_are_not_executed():
    messages = [
        AIMessage("", tool_calls=[{"name": "prompt_gen", "args": {}, "id": "a", "type": "tool_call"}]),
        ToolMessage("Instruction: Add", tool_call_id="a", name="prompt_gen"),
        AIMessage("", tool_calls=[{"name": "mask_gen", "args": {"image": 5}, "id": "b", "type": "tool_call"}]),
        error_message("Error: there is no image 5", tool_call_id="b", name="mask_gen"),
    ]
    assert [(c.name, c.steps_before) for c in executed_calls(messages)] == [("prompt_gen", 0)]


def test_tasks_are_sampled_reproducibly(tmp_path):
    first = make_tasks(tmp_path / "a", 7, seed=2, size=64)
    again = make_tasks(tmp_path / "b", 7, seed=2, size=64)
    assert [(t.category, t.anomaly_type, t.seed) for t in first] == [(t.category, t.anomaly_type, t.seed) for t in again]
    assert len({t.category for t in first}) > 1


def test_scripted_policy_scores_full_marks_on_format_and_protocol(capsys):
    assert main(["eval", "policy", "--policy", "scripted", "--tasks", "6", "--seed", "1", "--size", "64"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"policy valid_turns (\S+) protocol (\S+) masked_runs (\S+) score (\S+)", last)
    assert match, last
    valid, protocol, masked, score = map(float, match.groups())
    assert valid == 1.0 and protocol == 1.0 and masked == 1.0 and 0 < score <= 10

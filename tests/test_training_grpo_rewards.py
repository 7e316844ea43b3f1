"""The three GRPO rewards on hand-written trajectories: each component moves the way DESIGN §6 says."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from graph.protocol import repeated_call_turns
from training.grpo_rewards import RewardWeights, reflection_reward, score_rollout, task_reward

WEIGHTS = RewardWeights(task=1.0, reflection=1.0, behaviour=0.5, over_budget_penalty=0.1)
FAIL = {"location": 5.0, "quality": 2.0, "passed": False}
PASS = {"location": 5.0, "quality": 4.8, "passed": True}


def run(steps: list[tuple[str, dict[str, Any], str]], evaluations: dict[str, dict[str, Any]], *,
        final: str | None = "Done.", status: str = "success", mask_by: str = "policy", score: float | None = None,
        raw_turns: list[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """An output + record pair from (tool, args, observation) steps, as the graph would return them."""
    messages: list[Any] = [SystemMessage("s"), HumanMessage("t")]
    for text in raw_turns:
        messages.append(AIMessage(content="", invalid_tool_calls=[{"name": None, "args": text, "id": "bad", "error": "x",
                                                                   "type": "invalid_tool_call"}]))
        messages.append(ToolMessage("Error: could not parse the tool call", tool_call_id="bad", status="error"))
    for i, (name, args, observation) in enumerate(steps):
        messages.append(AIMessage(content="thought", tool_calls=[{"name": name, "args": args, "id": f"c{i}"}]))
        marked = "error" if observation.startswith("Error:") else "success"  # as the graph marks its error observations
        messages.append(ToolMessage(observation, tool_call_id=f"c{i}", name=name, status=marked))
    if final is not None:
        messages.append(AIMessage(content=final))
    last = max(evaluations, key=int) if evaluations else None
    if score is None:
        score = evaluations[last]["location"] + evaluations[last]["quality"] if last else 0.0
    result = {"status": status, "steps": len(steps) + len(raw_turns), "mask_by": mask_by, "score": score,
              "image_gens": sum(s[0] == "image_gen" for s in steps)}
    return {"messages": messages, "result": result, "status": status}, {"evaluations": evaluations}


def expert(first: dict[str, Any] = PASS) -> tuple[dict[str, Any], dict[str, Any]]:
    steps = [("prompt_gen", {}, "Instruction: x"), ("image_gen", {"prompt": "add a crack", "image": 1}, "Generated <image 2>"),
             ("quality_eval", {"image": 2}, "Image 2: ..."), ("mask_gen", {"image": 2}, "Mask of image 2")]
    return run(steps, {"2": first})


def retry(second: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    steps = [("prompt_gen", {}, "Instruction: x"), ("image_gen", {"prompt": "add a crack", "image": 1}, "Generated <image 2>"),
             ("quality_eval", {"image": 2}, "Image 2: FAIL"), ("knowledge_retrieval", {}, "Knowledge"),
             ("prompt_gen", {"feedback": "higher contrast"}, "Instruction: y"),
             ("image_gen", {"prompt": "add a darker crack", "image": 1}, "Generated <image 3>"),
             ("quality_eval", {"image": 3}, "Image 3"), ("mask_gen", {"image": 3}, "Mask of image 3")]
    return run(steps, {"2": FAIL, "3": second})


def score(pair: tuple[dict[str, Any], dict[str, Any]]):
    return score_rollout(*pair, max_steps=10, max_image_gens=3, weights=WEIGHTS)


def test_task_reward_rises_with_the_final_qe_score_and_mixes_in_mask_iou():
    assert task_reward({"score": 9.0})[0] > task_reward({"score": 6.0})[0] > task_reward({})[0] == 0.0
    assert task_reward({"score": 8.0, "mask_iou": 1.0}, 0.5)[0] > task_reward({"score": 8.0, "mask_iou": 0.2}, 0.5)[0]
    assert score(expert(PASS)).task > score(expert({"location": 5.0, "quality": 3.5, "passed": True})).task


def test_reflection_pays_only_for_improvements_between_attempts():
    assert reflection_reward({"2": FAIL, "3": PASS}) > 0
    assert reflection_reward({"2": PASS, "3": FAIL}) == 0.0
    assert reflection_reward({"2": PASS}) == 0.0
    assert reflection_reward({"2": FAIL, "3": {"location": 5.0, "quality": 3.0}, "4": PASS}) == reflection_reward({"2": FAIL, "4": PASS})
    fixed, unchanged = score(retry(PASS)), score(retry(FAIL))
    assert fixed.reflection > unchanged.reflection == 0.0
    assert fixed.total > unchanged.total


def test_behaviour_rewards_valid_turns_protocol_order_and_masking():
    good = score(expert())
    assert good.behaviour == 1.0 and good.protocol and good.masked_by_policy
    kr_first = run([("knowledge_retrieval", {}, "K"), ("prompt_gen", {}, "I"),
                    ("image_gen", {"prompt": "add a crack", "image": 1}, "Generated <image 2>"),
                    ("quality_eval", {"image": 2}, "Q"), ("mask_gen", {"image": 2}, "M")], {"2": PASS})
    assert not score(kr_first).protocol and score(kr_first).behaviour < good.behaviour
    unmasked = run([("prompt_gen", {}, "I"),
                   ("image_gen", {"prompt": "add a crack", "image": 1}, "Generated <image 2>"),
                   ("quality_eval", {"image": 2}, "Q")], {"2": PASS}, final="stop", status="incomplete", mask_by="finalize")
    assert score(unmasked).behaviour < good.behaviour
    with_bad_turn = expert()
    steps_bad = run([("prompt_gen", {}, "I"), ("image_gen", {"prompt": "add a crack", "image": 1}, "Generated <image 2>"),
                     ("quality_eval", {"image": 2}, "Q"), ("mask_gen", {"image": 2}, "M")], {"2": PASS}, raw_turns=["{oops"])
    assert score(steps_bad).valid_turns < score(with_bad_turn).valid_turns
    assert score(steps_bad).behaviour < good.behaviour


def test_calls_over_budget_are_penalised():
    steps = [("prompt_gen", {}, "I"), ("image_gen", {"prompt": "add a crack", "image": 1}, "Generated <image 2>"),
             ("quality_eval", {"image": 2}, "Q"), ("mask_gen", {"image": 2}, "M")]
    within = run(steps, {"2": PASS})
    over = run(steps, {"2": PASS})
    over[0]["messages"].insert(-1, AIMessage(content="", tool_calls=[{"name": "image_gen", "args": {"prompt": "again", "image": 1}, "id": "z"}]))
    over[0]["messages"].insert(-1, ToolMessage("Error: the image_gen budget is used up; call mask_gen", tool_call_id="z",
                                                  status="error"))
    exhausted = run(steps, {"2": PASS}, status="budget_exhausted")
    assert score(over).over_budget == 1 and score(exhausted).over_budget == 1 and score(within).over_budget == 0
    assert score(over).behaviour < score(within).behaviour
    assert score(exhausted).total < score(within).total


def test_repeating_a_call_that_answers_the_same_thing_is_penalised_and_a_qe_loop_scores_below_a_success():
    steps = [("prompt_gen", {}, "I"), ("image_gen", {"prompt": "add a crack", "image": 1}, "Generated <image 2>"),
             ("quality_eval", {"image": 2}, "Image 2: PASS")]
    loop = run(steps + [("quality_eval", {"image": 2}, "Image 2: PASS")] * 7, {"2": PASS}, final=None,
               status="budget_exhausted", mask_by="finalize")  # a policy that learned a QE loop, turn for turn
    retry_same_image = run(steps + [("image_gen", {"prompt": "add a crack", "image": 1}, "Generated <image 3>"),
                                    ("quality_eval", {"image": 3}, "Image 3: PASS"), ("mask_gen", {"image": 3}, "M")],
                           {"2": PASS, "3": PASS})
    assert score(loop).repeated_calls == 7 and score(expert()).repeated_calls == 0
    assert repeated_call_turns(loop[0]["messages"]) == [False] * 3 + [True] * 7  # one flag per assistant turn
    assert not any(repeated_call_turns(retry_same_image[0]["messages"]))
    assert score(retry_same_image).repeated_calls == 0  # image_gen samples anew; new images are new arguments
    assert score(loop).valid_turns == 1.0 and score(loop).protocol  # what let the loop through before
    assert score(loop).total < score(expert()).total - 0.5
    no_penalty = RewardWeights(task=1.0, reflection=1.0, behaviour=0.5, over_budget_penalty=0.1, repeated_call_penalty=0.0)
    lenient = score_rollout(*loop, max_steps=10, max_image_gens=3, weights=no_penalty)
    assert lenient.total - score(loop).total == pytest.approx(0.5 * 0.1 * 7)


def test_a_run_of_malformed_outputs_is_scored_low_without_raising():
    garbage = run([], {}, final=None, status="budget_exhausted", mask_by="", raw_turns=["{not json", "<tool_call>zz", "{}"])
    reward = score(garbage)
    assert reward.task == 0.0 and reward.reflection == 0.0 and reward.valid_turns == 0.0 and not reward.protocol
    assert reward.total < 0 < score(expert()).total
    empty = score_rollout({}, {}, max_steps=10, max_image_gens=3, weights=WEIGHTS)
    assert empty.total <= 0.0


def test_turns_the_graph_refused_are_marked_turn_by_turn():
    from graph.protocol import turns_accepted

    steps = [("prompt_gen", {}, "Instruction: x"),
             ("quality_eval", {"image": 1}, "Error: invalid arguments for quality_eval"),  # fails its schema
             ("image_gen", {"prompt": "add a crack", "image": 1}, "Generated <image 2>"),
             ("quality_eval", {"image": 7}, "Error: there is no image 7"),  # validates, but the graph refuses it
             ("mask_gen", {"image": 2}, "Mask of image 2")]
    output, _ = run(steps, {})
    assert turns_accepted(output["messages"]) == [True, False, True, False, True, True]  # the answer after the mask
    early, _ = run(steps[:1], {}, final="Here is your defect.")  # an answer before any mask is refused
    assert turns_accepted(early["messages"]) == [True, False]
    garbage, _ = run([], {}, final=None, raw_turns=["{not json"])
    assert turns_accepted(garbage["messages"]) == [False]

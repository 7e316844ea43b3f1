"""The GRPO update guard on a real tiny model whose greedy reply is known: probes from successful runs, the
line search that halves an update that breaks a forced call, and the undo of one that breaks it at every size."""

from __future__ import annotations

import json

import pytest
from tiny_llm import build_tiny_llm

from graph.protocol import FINAL_ANSWER
from training.grpo_guard import (Probe, UpdateGuard, called_tool, candidate_probes, checked_positions,
                                 probe_passes, turn_move)
from training.grpo_rewards import RewardBreakdown
from training.grpo_rollouts import Rollout, Turn

pytestmark = pytest.mark.timeout(300)

PROMPT_GEN_CALL = '<tool_call>\n{"name": "prompt_gen", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def writes_prompt_gen(tmp_path_factory):
    """A LocalModel whose greedy reply to any conversation is exactly `PROMPT_GEN_CALL` (one token), then the end."""
    from graph.inference import LocalModel, load_local_model

    folder = build_tiny_llm(tmp_path_factory.mktemp("guard") / "model", fixed_reply=PROMPT_GEN_CALL)
    loaded = load_local_model(folder)
    return LocalModel(loaded.path, loaded.tokenizer, loaded.model)  # its own object: tests change its weights


def state_prompt(local, text: str) -> list[int]:
    return local.render([{"role": "user", "content": text}], None)


def breakdown(status: str, protocol: bool = True) -> RewardBreakdown:
    return RewardBreakdown(total=1.0, task=1, reflection=0, behaviour=1, score=10, mask_iou=None, valid_turns=1,
                           protocol=protocol, masked_by_policy=True, over_budget=0, repeated_calls=0, image_gens=1,
                           status=status)


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_called_tool_names_only_a_single_call_that_validates():
    assert called_tool("First, an instruction.\n" + PROMPT_GEN_CALL) == "prompt_gen"
    assert called_tool(call("quality_eval", '{"image": 2}')) == "quality_eval"
    assert called_tool(call("quality_eval", '{"image": "two"}')) is None  # does not validate
    assert called_tool(call("mask_gen", '{"image": 2')) is None  # malformed JSON
    assert called_tool(PROMPT_GEN_CALL + PROMPT_GEN_CALL) is None  # two calls
    assert called_tool("Done: image 2 and its mask.") is None


def test_called_tool_names_only_a_single_call_that_validates_and_a_turn_without_one_is_the_answer():
    assert turn_move("Image 2 has the defect and its mask. Done.") == FINAL_ANSWER
    assert turn_move(call("quality_eval", '{"image": 2}')) == "quality_eval"
    assert turn_move(call("mask_gen", '{"image": 2')) is None  # a broken call is no answer
    assert turn_move(PROMPT_GEN_CALL + PROMPT_GEN_CALL) is None


def test_the_checked_tokens_are_the_whole_turn_and_for_image_gen_stop_before_its_free_text(writes_prompt_gen):
    tokenizer = writes_prompt_gen.tokenizer
    end = tokenizer.eos_token
    qe = tokenizer.encode("Check image 2.\n" + call("quality_eval", '{"image": 2}') + end)
    checked = checked_positions(tokenizer, 100, qe, "quality_eval")
    assert tokenizer.decode([qe[i - 100] for i in checked]) == "Check image 2.\n" + call("quality_eval", '{"image": 2}') + end
    ig = tokenizer.encode("Apply it.\n" + call("image_gen", '{"prompt": "a thin crack"}') + end)
    checked = checked_positions(tokenizer, 0, ig, "image_gen")
    assert tokenizer.decode([ig[i] for i in checked]) == (
        'Apply it.\n<tool_call>\n{"name": "image_gen", "arguments": {"prompt": "')
    answer = tokenizer.encode("Image 2 and its mask. Done." + end)
    assert checked_positions(tokenizer, 7, answer, FINAL_ANSWER) == tuple(range(7, 7 + len(answer)))


def test_probes_are_the_forced_calls_of_successful_protocol_runs_only(writes_prompt_gen):
    local = writes_prompt_gen
    ids = local.tokenizer.encode

    def turn(n: int, text: str, accepted: bool = True) -> Turn:
        return Turn(state_prompt(local, f"state {n}"), ids(text), None, accepted)

    success = [turn(0, PROMPT_GEN_CALL), turn(1, call("image_gen", '{"prompt": "a crack"}')),
               turn(2, call("mask_gen", '{"image": 2}'), accepted=False),  # refused: skipped
               turn(3, call("quality_eval", '{"image": 2}')),
               turn(4, call("knowledge_retrieval", '{"query": "crack"}')),  # after a failed QE: a free choice
               turn(5, call("image_gen", '{"prompt": "a deeper crack"}')),  # after KR: a free choice too
               turn(6, call("quality_eval", '{"image": 3}')), turn(7, call("mask_gen", '{"image": 3}')),
               turn(8, "Image 3 and its mask.")]
    task = object()
    groups = [[Rollout(task, 0, 0, 1, breakdown("success"), success),
               Rollout(task, 0, 1, 2, breakdown("budget_exhausted"), success),
               Rollout(task, 0, 2, 3, breakdown("success", protocol=False), success)]]
    probes = candidate_probes(groups, local.tokenizer)
    assert [(p.ids, p.tool) for p in probes] == [
        ((*success[n].prompt_ids, *success[n].token_ids), tool)
        for n, tool in ((0, "prompt_gen"), (1, "image_gen"), (3, "quality_eval"), (6, "quality_eval"), (7, "mask_gen"),
                        (8, FINAL_ANSWER))]

    guard = UpdateGuard(local.model, local.tokenizer, per_tool=1, backtracks=2)
    # One candidate per forced call, kept only where the model's greedy choice is the run's call today: this
    # model writes its one reply token after any prompt, so only the prompt_gen turn (that token) passes.
    assert guard.add_probes(groups) == 1
    assert guard.probes == [probes[0]]
    assert guard.add_probes(groups) == 0  # already there; the others still fail

    resumed = UpdateGuard(local.model, local.tokenizer, per_tool=1, backtracks=2)
    resumed.restore(json.loads(json.dumps(guard.probe_records())))  # through the checkpoint's JSON
    assert resumed.probes == guard.probes and resumed.passes(resumed.probes) == [True]
    assert resumed.add_probes(groups) == 0


def reply_margin(local, prompt: list[int]):
    """(the final hidden state at the prompt's end, the reply token's logit lead over the runner-up)."""
    import torch

    with torch.no_grad():
        out = local.model(input_ids=torch.tensor([prompt]), output_hidden_states=True)
    top = out.logits[0, -1].topk(2).values
    return out.hidden_states[-1][0, -1], float(top[0] - top[1])


def test_an_update_that_breaks_a_forced_call_is_halved_until_it_holds_or_undone(writes_prompt_gen):
    import torch

    local = writes_prompt_gen
    model = local.model
    for parameter in model.parameters():
        parameter.requires_grad = parameter is model.lm_head.weight
    optimizer = torch.optim.AdamW([model.lm_head.weight], lr=1e-3)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    optimizer.step()  # the optimizer has state to restore
    guard = UpdateGuard(model, local.tokenizer, per_tool=1, backtracks=2)
    reply = local.tokenizer.convert_tokens_to_ids(PROMPT_GEN_CALL)
    prompt = state_prompt(local, "a state")
    probe = Probe((*prompt, reply, local.tokenizer.eos_token_id), (len(prompt), len(prompt) + 1), "prompt_gen")
    guard.probes = [probe]
    assert probe_passes(model, guard.probes) == [True]
    start = model.lm_head.weight.detach().clone()

    def update(lead_lost: float):
        """An 'update' lowering the reply's logit at the probe state by `lead_lost` times its lead."""
        hidden, margin = reply_margin(local, prompt)
        before = guard.snapshot(optimizer)
        with torch.no_grad():
            model.lm_head.weight[reply] -= lead_lost * margin * hidden / hidden.dot(hidden)
            model.lm_head.weight[0] += 1e-3  # and something harmless elsewhere
        optimizer.state[model.lm_head.weight]["exp_avg"].add_(1.0)
        return guard.check(optimizer, before)

    assert update(0.5) == {"guard_scale": 1.0, "guard_passed": 1, "guard_probes": 1}
    kept = model.lm_head.weight.detach().clone()
    assert not torch.equal(kept, start)

    assert update(1.5) == {"guard_scale": 0.5, "guard_passed": 1, "guard_probes": 1}  # half of it keeps the call
    assert torch.allclose(model.lm_head.weight[0], kept[0] + 0.5e-3)
    assert probe_passes(model, guard.probes) == [True]

    halved = model.lm_head.weight.detach().clone()
    moments = optimizer.state[model.lm_head.weight]["exp_avg"].clone()
    assert update(20.0) == {"guard_scale": 0.0, "guard_passed": 0, "guard_probes": 1}  # broken even at 1/4
    assert torch.equal(model.lm_head.weight, halved)
    assert torch.equal(optimizer.state[model.lm_head.weight]["exp_avg"], moments)
    assert probe_passes(model, guard.probes) == [True]
    assert local.generate([{"role": "user", "content": "a state"}], max_new_tokens=4).text == PROMPT_GEN_CALL


def test_a_guard_that_is_off_or_has_no_probes_changes_nothing(writes_prompt_gen):
    import torch

    guard = UpdateGuard(writes_prompt_gen.model, writes_prompt_gen.tokenizer, per_tool=0, backtracks=2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert not guard.enabled and guard.add_probes([]) == 0
    assert guard.snapshot(optimizer) is None
    assert guard.check(optimizer, None) == {}


def test_a_probe_fails_when_the_thought_is_no_longer_greedy_though_the_call_after_it_still_is(writes_prompt_gen):
    """Teacher-forced on the written thought, the call can still be greedy while the policy's own turn has
    changed. This model writes its call straight away, never this thought."""
    local = writes_prompt_gen
    tokenizer = local.tokenizer
    prompt = state_prompt(local, "a state")
    turn = [*tokenizer.encode("First, an instruction.\n"), tokenizer.convert_tokens_to_ids(PROMPT_GEN_CALL),
            tokenizer.eos_token_id]
    ids = (*prompt, *turn)
    call_only = Probe(ids, tuple(range(len(ids) - 2, len(ids))), "prompt_gen")
    whole_turn = Probe(ids, checked_positions(tokenizer, len(prompt), turn, "prompt_gen"), "prompt_gen")
    assert whole_turn.checked == tuple(range(len(prompt), len(ids)))
    assert probe_passes(local.model, [call_only, whole_turn]) == [True, False]

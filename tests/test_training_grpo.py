"""GRPO end to end on a tiny random model: rollouts through the real graph, one update, resume, and the
openai rollout backend against `serve-policy` as a real subprocess (with its weight sync)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import yaml
from served_policy import Served
from tiny_llm import build_tiny_llm

from anomaly_agent_cli import main
from training import grpo_rollouts
from training.grpo_config import GRPOConfigError, GRPOJobConfig
from training.grpo_loss import (build_sequences, frozen_trunk_layers, group_advantages, per_token_loss,
                                policy_and_reference_logprobs, pushed_down_positions, rollout_sequences)
from training.grpo_rewards import RewardBreakdown, score_rollout
from training.grpo_rollouts import Turn, run_groups

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("grpo-tiny") / "model")


def job(tmp: Path, model: Path, **fields) -> GRPOJobConfig:
    base = {"output_dir": str(tmp / "out"), "model": str(model), "graph": {"max_steps": 3}, "num_generations": 2,
            "max_steps": 1, "train_tasks": 2, "heldout_tasks": 1, "eval_generations": 2, "max_completion_length": 12,
            "trainable_layers": 1, "learning_rate": 1e-2, "save_steps": 1, "workers": 2, "evaluate_before_after": False}
    return GRPOJobConfig.from_dict({**base, **fields})


@pytest.fixture
def likelihood_reward(monkeypatch):
    """The real reward plus the log-probability of what the rollout generated (higher when it was likelier).

    A random model's rollouts are all equally malformed, so their real rewards tie and the group would be
    dropped; this keeps the real scoring path and gives the group a spread to learn from.
    """

    def scored(output, record, **kwargs):
        reward = score_rollout(output, record, **kwargs)
        logprob = sum(sum((m.response_metadata or {}).get("logprobs") or []) for m in output.get("messages") or [])
        return type(reward)(**{**reward.as_dict(), "total": reward.total + logprob / 100})

    monkeypatch.setattr(grpo_rollouts, "score_rollout", scored)


def trained_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def reward_of(total: float) -> RewardBreakdown:
    """A successful run's reward breakdown with only its total set (what the advantage code reads)."""
    return RewardBreakdown(total=total, task=0, reflection=0, behaviour=0, score=0, mask_iou=None, valid_turns=1,
                           protocol=True, masked_by_policy=True, over_budget=0, repeated_calls=0, image_gens=1,
                           status="success")


def tiny_llama(layers: int = 4):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def test_malformed_rollouts_are_scored_and_keep_their_token_ids(tiny, tmp_path, sample_dir):
    from graph.tasks import make_tasks

    config = job(tmp_path, tiny)
    tasks = make_tasks(tmp_path / "tasks", 1, seed=7)
    groups = run_groups(tasks, 2, config.graph_overrides(), tmp_path / "runs", config.rewards, workers=2)
    assert len(groups) == 1 and len(groups[0]) == 2
    for rollout in groups[0]:
        assert math.isfinite(rollout.reward.total) and rollout.reward.valid_turns == 0.0
        assert rollout.reward.total < 0.5 and rollout.turns and rollout.untracked_turns == 0
        for turn in rollout.turns:
            assert turn.logprobs is not None and len(turn.logprobs) == len(turn.token_ids) <= 12
            assert not turn.accepted  # a random model's turns are all refused by the graph
        assert rollout.log_row()["rejected_turns"] == len(rollout.turns)
        assert len(rollout.thoughts) == len(rollout.turns)  # one text per assistant message, for top_thought_share
        sequences = build_sequences(rollout.turns, 1.0)
        assert sum(len(s.positions) for s in sequences) == sum(len(t.token_ids) for t in rollout.turns)


def test_prefix_cache_continues_a_conversation_with_the_same_tokens_and_logprobs(tiny):
    from graph.inference import load_local_model
    from graph.tool_calls import tool_schemas

    model = load_local_model(tiny)

    def conversation() -> list:
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "add a crack"}]
        out = []
        for turn in range(3):
            g = model.generate(messages, tools=tool_schemas(), temperature=1.0, max_new_tokens=8, seed=turn, logprobs=True)
            out.append((g.token_ids, g.logprobs))
            messages = messages + [{"role": "assistant", "content": g.text}, {"role": "user", "content": f"result {turn}"}]
        return out

    try:
        plain = conversation()
        model.enable_prefix_cache(4)
        cached = conversation()
        assert len(model.prefix_cache)  # the cache was used and kept
    finally:
        model.enable_prefix_cache(0)
    for (ids_a, lp_a), (ids_b, lp_b) in zip(plain, cached):
        assert ids_a == ids_b and max(abs(a - b) for a, b in zip(lp_a, lp_b)) < 1e-4


def test_sequences_merge_turns_that_extend_each_other_and_split_otherwise():
    a = Turn([1, 2, 3], [4, 5], [-0.1, -0.2])
    b = Turn([1, 2, 3, 4, 5, 9], [6], [-0.3])
    c = Turn([1, 2, 7], [8], [-0.4])
    merged = build_sequences([a, b], 0.5)
    assert len(merged) == 1 and merged[0].ids == [1, 2, 3, 4, 5, 9, 6] and merged[0].positions == [3, 4, 6]
    assert merged[0].old_logprobs == [-0.1, -0.2, -0.3]
    split = build_sequences([a, c], 0.5)
    assert [s.ids for s in split] == [[1, 2, 3, 4, 5], [1, 2, 7, 8]]


def test_advantages_are_group_relative_and_flat_groups_are_dropped():
    assert group_advantages([1.0, 1.0, 1.0]) is None
    advantages = group_advantages([0.0, 1.0])
    assert advantages[0] < 0 < advantages[1] and abs(sum(advantages)) < 1e-9


def test_step_summary_counts_repeated_calls_and_the_share_of_the_commonest_thought():
    import dataclasses

    from training.grpo_rollouts import Rollout, reward_summary, top_thought_share

    def rollout(member, thoughts, repeats):
        reward = dataclasses.replace(reward_of(1.0), repeated_calls=repeats)
        return Rollout(task=None, group=0, member=member, seed=member, reward=reward, thoughts=thoughts)

    varied = ["First, write an instruction.", "Make image 2.", "Check whether image 2 is good.", "Done."]
    collapsed = ["First, write an instruction.", "Image 2.", "Image 2.", "Image 2.", "Image 2."]
    assert top_thought_share([]) == 0.0 and top_thought_share(varied) == 0.25
    summary = reward_summary([[rollout(0, varied, 0), rollout(1, varied, 0)]])
    assert summary["top_thought_share"] == 0.25 and summary["repeated_calls"] == 0
    summary = reward_summary([[rollout(0, varied, 0), rollout(1, collapsed, 3)]])
    assert summary["top_thought_share"] == pytest.approx(4 / 9) and summary["repeated_calls"] == 3


def test_batch_and_unscaled_advantages_do_not_blow_up_a_group_with_a_tiny_spread():
    from training.grpo_rollouts import Rollout

    def group(*totals):
        return [Rollout(task=None, group=0, member=i, seed=i, reward=reward_of(t), turns=[Turn([1, 2], [3], [-0.5])])
                for i, t in enumerate(totals)]

    groups = [group(1.5, 1.5, 1.5, 1.48), group(1.5, 0.2, 1.5, 1.5)]  # QE rounding vs a real failure
    by_group = [s.advantage for s in rollout_sequences(groups, "group")[0]]
    by_batch = [s.advantage for s in rollout_sequences(groups, "batch")[0]]
    unscaled = [s.advantage for s in rollout_sequences(groups, "none")[0]]
    assert by_group[3] == pytest.approx(-1.5, abs=0.02)  # 0.02 below the others weighs like the failure
    assert abs(by_batch[3]) < 0.05 and by_batch[5] < -1.0 and unscaled[3] == pytest.approx(-0.015, abs=1e-3)
    assert rollout_sequences([group(1.0, 1.0)] + groups, "batch")[1] == 1  # flat groups are still dropped
    with pytest.raises(ValueError, match="scale_rewards"):
        rollout_sequences(groups, "mean")


def test_refused_turns_get_their_own_push_down_and_keep_a_flat_group():
    import torch

    from training.grpo_rollouts import Rollout

    def rollout(total, accepted):
        turns = [Turn([1, 2], [3, 4], [-0.5, -0.5], accepted[0]), Turn([1, 2, 3, 4, 9], [5], [-0.7], accepted[1])]
        return Rollout(task=None, group=0, member=0, seed=0, turns=turns,
                       reward=reward_of(total))

    good, bad = rollout(1.5, (True, True)), rollout(0.5, (True, False))
    plain = rollout_sequences([[good, bad]], "none")[0]
    credited = rollout_sequences([[good, bad]], "none", rejected_turn_advantage=1.0)[0]
    def advantages(sequences):
        return [[round(a, 3) for a in s.advantages()] for s in sequences]

    assert advantages(plain) == [[0.5] * 3, [-0.5] * 3]  # DESIGN §6: one advantage per run
    assert advantages(credited) == [[0.5] * 3, [-0.5, -0.5, -1.5]]  # only the refused turn's token
    flat = [rollout(0.5, (True, False)), rollout(0.5, (True, True))]
    assert rollout_sequences([flat], "none")[1] == 1  # without turn credit a flat group has no signal
    kept, dropped = rollout_sequences([flat], "none", rejected_turn_advantage=1.0)
    assert dropped == 0 and advantages(kept) == [[0.0, 0.0, -1.0], [0.0] * 3]
    logp = torch.zeros(3, requires_grad=True)
    loss, _, _ = per_token_loss(logp, logp.detach(), None, torch.tensor(credited[1].advantages()), beta=0.0, epsilon=0.2)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.5, 0.5, 1.5], abs=1e-3)  # descent lowers the refused token the most


def test_refusal_credit_first_trains_a_failed_run_up_to_its_first_refusal_and_never_pushes_a_refusal_up():
    from training.grpo_rollouts import Rollout

    def rollout(total, accepted):
        # turns that extend each other: [1, 2] -> 3 | +9 -> 4 | +9 -> 5 | +9 -> 6 (one sequence per run)
        turns, prompt = [], [1, 2]
        for i, ok in enumerate(accepted):
            turns.append(Turn(list(prompt), [3 + i], [-0.1 * (i + 1)], ok))
            prompt = prompt + [3 + i, 9]
        return Rollout(task=None, group=0, member=0, seed=0, turns=turns,
                       reward=reward_of(total))

    failed = rollout(0.2, (True, False, False, True))    # a bad turn, a copy of it, then a valid turn
    recovered = rollout(1.3, (True, False, True, True))  # above the group's mean despite one refusal
    good = rollout(1.5, (True, True, True, True))
    groups = [[failed, recovered], [failed, good]]
    every = rollout_sequences(groups, "none")[0]
    first = rollout_sequences(groups, "none", refusal_credit="first")[0]
    assert [len(s.positions) for s in every] == [4, 4, 4, 4]  # DESIGN §6: every token of every run
    (failed_a, recovered_a, failed_b, good_b) = first
    assert failed_a.advantage < 0 and failed_a.ids[failed_a.positions[-1]] == 4  # up to the first refused turn
    assert failed_a.old_logprobs == pytest.approx([-0.1, -0.2]) and failed_b.positions == failed_a.positions
    assert recovered_a.advantage > 0 and [recovered_a.ids[p] for p in recovered_a.positions] == [3, 5, 6]
    assert recovered_a.old_logprobs == pytest.approx([-0.1, -0.3, -0.4])  # aligned with the kept positions
    assert good_b.positions == every[3].positions  # a clean run is trained on whole
    lucky = rollout_sequences([[rollout(1.5, (False,)), rollout(0.5, (True,))]], "none", refusal_credit="first")[0]
    assert len(lucky) == 1 and lucky[0].advantage < 0  # a run of refused turns alone is never pushed up
    with pytest.raises(ValueError, match="refusal_credit"):
        rollout_sequences(groups, "none", refusal_credit="last")


def test_first_refusal_is_pushed_down_on_its_unlikely_tokens_only_whatever_the_runs_advantage():
    from training.grpo_rollouts import Rollout

    def rollout(total, accepted):
        # each turn samples a likely token (p 0.9) then an unlikely one (p 0.1); the turns extend each other
        turns, prompt = [], [1, 2]
        for i, ok in enumerate(accepted):
            ids = [10 + 2 * i, 11 + 2 * i]
            turns.append(Turn(list(prompt), ids, [math.log(0.9), math.log(0.1)], ok))
            prompt = prompt + ids + [9]
        return Rollout(task=None, group=0, member=0, seed=0, turns=turns, reward=reward_of(total))

    def pushed(sequence):
        return {sequence.ids[p]: round(a, 3) for p, a in zip(sequence.positions, sequence.advantages())}

    recovered = rollout(1.3, (True, False, False, True))  # above its group's mean despite a refusal and a copy
    failed = rollout(0.3, (True, False, True))
    up, down = rollout_sequences([[recovered, failed]], "none", rejected_turn_advantage=1.0, refusal_credit="first",
                                 negative_advantage_scale=0.0, rejected_token_max_prob=0.5)[0]
    assert pushed(up) == {10: 0.5, 11: 0.5, 13: -1.0, 16: 0.5, 17: 0.5}  # first refusal: -c on its p 0.1 token
    assert pushed(down) == {13: -1.0}  # a failed run at scale 0: only its refusal's unlikely token
    every_token = rollout_sequences([[recovered, failed]], "none", rejected_turn_advantage=1.0,
                                    refusal_credit="first", negative_advantage_scale=1.0)[0]
    assert pushed(every_token[1]) == {10: -0.5, 11: -0.5, 12: -1.5, 13: -1.5}  # A - c, up to the first refusal
    flat = [rollout(0.5, (True, False, False)), rollout(0.5, (True, True, True))]
    kept, dropped = rollout_sequences([flat], "none", rejected_turn_advantage=1.0, refusal_credit="first",
                                      rejected_token_max_prob=0.5)
    assert dropped == 0 and [pushed(s) for s in kept] == [{13: -1.0}]  # not the copy, not the clean run
    at_mean = rollout_sequences([[rollout(1.0, (True, False)), rollout(0.5, (True,)), rollout(1.5, (True,))]], "none",
                                refusal_credit="first")[0]
    assert pushed(at_mean[0]) == {10: 0.0, 11: 0.0, 12: 0.0, 13: 0.0}  # without c: A = 0 keeps the KL term on every turn
    unrecorded = Turn([1, 2], [3, 4], None, False)
    assert pushed_down_positions(unrecorded, 0.5) == [0, 1]  # no log-probabilities: every token


def test_refusal_credit_first_never_pushes_up_a_call_that_repeats_an_earlier_one():
    from training.grpo_rollouts import Rollout

    def looping(total, repeats):  # PG, IG, QE, then QE on the same image again and again
        turns, prompt = [], [1, 2]
        for i, repeat in enumerate(repeats):
            turns.append(Turn(list(prompt), [3 + i], [-0.1], True, repeat))
            prompt = prompt + [3 + i, 9]
        return Rollout(task=None, group=0, member=0, seed=0, turns=turns, reward=reward_of(total))

    less, more = looping(1.2, (False, False, False, True)), looping(1.0, (False, False, False, True, True, True))
    up, down = rollout_sequences([[less, more]], "none", refusal_credit="first", negative_advantage_scale=1.0)[0]
    assert up.advantage > 0 and [up.ids[p] for p in up.positions] == [3, 4, 5]  # its repeated QE: context only
    assert down.advantage < 0 and [down.ids[p] for p in down.positions] == [3, 4, 5, 6]  # blamed at its first repeat
    every = rollout_sequences([[less, more]], "none")[0]
    assert [len(s.positions) for s in every] == [4, 6]  # "run": DESIGN §6, every token


def test_negative_advantage_scale_shrinks_only_the_runs_below_their_group_and_zero_drops_them():
    from training.grpo_rollouts import Rollout

    def group(*totals):
        return [Rollout(task=None, group=0, member=i, seed=i, turns=[Turn([1, 2], [3 + i], [-0.5])],
                        reward=reward_of(t))
                for i, t in enumerate(totals)]

    groups = [group(1.5, 0.3, 1.2), group(1.0, 1.0)]  # mean 1.0: +0.5, -0.7, +0.2; the flat group is dropped
    full, dropped = rollout_sequences(groups, "none")
    half = rollout_sequences(groups, "none", negative_advantage_scale=0.5)[0]
    positive, dropped_too = rollout_sequences(groups, "none", negative_advantage_scale=0.0)
    assert [round(s.advantage, 3) for s in full] == [0.5, -0.7, 0.2] and dropped == dropped_too == 1
    assert [round(s.advantage, 3) for s in half] == [0.5, -0.35, 0.2]
    assert [round(s.advantage, 3) for s in positive] == [0.5, 0.2]  # the failed run is not even context
    assert [s.ids[s.positions[0]] for s in positive] == [3, 5]


def test_shared_frozen_trunk_gives_the_same_logprobs_and_gradients_as_two_full_forwards():
    import copy

    import torch

    from training.sft import freeze_for_training

    model = tiny_llama()
    ref = copy.deepcopy(model).eval()
    freeze_for_training(model, 2, False)
    with torch.no_grad():  # the policy has moved away from its reference in the trained layers only
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    assert frozen_trunk_layers(model) == 2
    ids, positions = torch.randint(0, 97, (40,)).tolist(), [20, 21, 22, 35, 39]

    def run(trunk):
        model.zero_grad(set_to_none=True)
        logp, ref_logp = policy_and_reference_logprobs(model, ref, ids, positions, trunk)
        (logp * torch.arange(1.0, 6.0)).sum().backward()
        return logp.detach(), ref_logp, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, shared = run(0), run(2)
    assert torch.allclose(full[0], shared[0], atol=1e-5) and torch.allclose(full[1], shared[1], atol=1e-5)
    assert not torch.allclose(full[0], full[1], atol=1e-3)  # the reference really differs from the policy
    assert full[2].keys() == shared[2].keys() and len(full[2]) > 0
    for name, grad in full[2].items():
        assert torch.allclose(grad, shared[2][name], atol=1e-5), name
    assert len(list(getattr(model, model.base_model_prefix).layers)) == 4  # the layers are back


def test_a_second_iteration_reuses_the_round_with_the_sampling_logprobs_and_clips():
    import copy

    import torch

    from training.grpo import policy_update
    from training.grpo_loss import Sequence, token_logprobs
    from training.sft import freeze_for_training

    model = tiny_llama()
    ref = copy.deepcopy(model).eval()
    freeze_for_training(model, 2, False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    sequences = []
    for advantage in (1.0, -1.0):
        ids = torch.randint(0, 97, (30,)).tolist()
        positions = list(range(20, 30))
        with torch.no_grad():
            old = token_logprobs(model, ids, positions).tolist()  # as the sampler recorded them
        sequences.append(Sequence(ids, positions, old, advantage))
    args = GRPOJobConfig(output_dir="unused", num_iterations=2, beta=0.04).to_trl()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    update = policy_update(model, ref, optimizer, sequences, args, apply=False)
    first, second = update["clip_fractions"]
    assert first == 0.0 and second > 0.0  # ratio 1 on the first pass, moved (and clipped) on the second
    assert optimizer.state_dict()["state"][0]["step"] == 2  # a step per pass, even inside an accumulation
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert update["grad_norm"] > 0 and math.isfinite(update["loss"])


def test_paired_difference_pairs_rollouts_by_task_and_seed():
    from training.grpo_rollouts import paired_difference

    paired = paired_difference({"totals": [1.5, 0.2, 1.0, 1.5]}, {"totals": [1.5, 1.5, 1.1, 1.5]})
    assert paired["mean"] == pytest.approx(0.35) and paired["pairs"] == 4
    assert paired["se"] == pytest.approx(paired["std"] / 2) and paired["std"] == pytest.approx(0.6351, abs=1e-4)
    assert paired_difference({"totals": [1.0]}, {"totals": [1.0]}) is None
    assert paired_difference({"totals": [1.0, 2.0]}, {"totals": [1.0]}) is None


def test_time_limit_stops_before_a_step_expected_to_end_past_it():
    from training.grpo import next_step_fits

    history = [{"seconds": 100.0}, {"seconds": 200.0}]  # the mean step: 150 s
    assert next_step_fits(300.0, history, 450.0)  # 300 + 150 ends exactly at the limit
    assert not next_step_fits(301.0, history, 450.0)  # the old rule (stop once past 450 s) would run a step more
    assert next_step_fits(0.0, [], 10.0) and not next_step_fits(11.0, [], 10.0)  # no forecast yet: only the limit
    assert next_step_fits(1e9, history, None)


def test_time_limit_forecast_follows_steps_that_grow():
    from training.grpo import expected_step_seconds, next_step_fits

    growing = [{"seconds": s} for s in (60.0, 60.0, 60.0, 60.0, 180.0, 180.0, 210.0)]  # mean 115.7, last three 190
    assert expected_step_seconds(growing) == pytest.approx(190.0)
    assert not next_step_fits(1750.0, growing, 1900.0)  # the plain mean (1750 + 116 <= 1900) would start a 200 s step
    shrinking = [{"seconds": s} for s in (200.0, 200.0, 60.0, 60.0, 60.0)]
    assert expected_step_seconds(shrinking) == pytest.approx(116.0)  # the mean of all: a short spell is not trusted
    assert expected_step_seconds([]) == 0.0


def test_clipped_loss_and_kl_follow_trl():
    import torch

    logp, old = torch.tensor([-1.0, -1.0]), torch.tensor([-1.5, -0.5])  # ratios e^0.5 (clipped), e^-0.5
    loss, kl, clipped = per_token_loss(logp, old, torch.tensor([-1.0, -2.0]), 1.0, beta=0.1, epsilon=0.2)
    assert loss[0].item() == pytest.approx(-1.2) and clipped.tolist() == [True, False]
    assert kl[0].item() == 0.0 and kl[1].item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert loss[1].item() == pytest.approx(-math.exp(-0.5) + 0.1 * kl[1].item())


def test_one_grpo_step_changes_the_weights_logs_a_finite_loss_and_resumes(tiny, tmp_path, sample_dir, likelihood_reward):
    from graph.inference import load_local_model

    before = {k: v.clone() for k, v in load_local_model(tiny).model.state_dict().items()}
    config_file = tmp_path / "grpo.yaml"
    fields = job(tmp_path, tiny).to_dict()
    config_file.write_text(yaml.safe_dump(fields))
    assert main(["train", "grpo", "--config", str(config_file)]) == 0
    out = Path(fields["output_dir"])
    rows = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["groups_dropped"] == 0 and rows[0]["tokens"] > 0
    assert math.isfinite(rows[0]["loss"]) and math.isfinite(rows[0]["kl"]) and rows[0]["grad_norm"] > 0
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 and {"task", "reflection", "behaviour", "total"} <= set(rollouts[0])
    after = trained_tensors(out / "final")
    changed = [k for k in after if k in before and not (after[k] == before[k]).all()]
    assert changed and all(".layers.1." in k or k == "model.norm.weight" for k in changed)
    assert (out / "reward_curve.png").stat().st_size > 1000
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1

    for name, lines in (("rewards.jsonl", 1), ("rollouts.jsonl", 2)):  # as a run killed after logging step 2
        logged = (out / name).read_text().splitlines()
        interrupted = [json.dumps({**json.loads(line), "step": 2}) for line in logged[:lines]]
        (out / name).write_text("\n".join(logged + interrupted) + "\n")
    (out / "heldout_after.jsonl").write_text('{"total": 0.0}\n')
    assert main(["train", "grpo", "--config", str(config_file), "--resume", "--max-steps", "2"]) == 0
    rows = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    rollout_steps = [json.loads(line)["step"] for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert rollout_steps == [1, 1, 2, 2] and not (out / "heldout_after.jsonl").exists()  # no evaluation here
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


def test_lora_step_trains_adapters_only_and_saves_a_merged_plain_model(tiny, tmp_path, sample_dir, likelihood_reward):
    from graph.inference import load_local_model

    import shutil

    tiny_copy = tmp_path / "tiny"  # its own model object: peft adds adapters to it in place
    shutil.copytree(tiny, tiny_copy)
    start = trained_tensors(tiny_copy)
    config_file = tmp_path / "grpo.yaml"
    fields = {**job(tmp_path, tiny_copy).to_dict(), "lora_r": 2, "lora_alpha": 4.0, "guard_probes_per_tool": 1}
    config_file.write_text(yaml.safe_dump(fields))
    assert main(["train", "grpo", "--config", str(config_file)]) == 0
    out = Path(fields["output_dir"])
    row = json.loads((out / "rewards.jsonl").read_text().splitlines()[0])
    assert row["tokens"] > 0 and math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert row["probes_added"] == 0 and "guard_scale" not in row  # no successful run to take a probe from
    assert row["guard_seconds"] >= 0
    summary = json.loads((out / "grpo_summary.json").read_text())
    assert 0 < summary["parameters"]["trainable"] < summary["parameters"]["total"] / 20  # adapters only
    saved = (out / "checkpoint" / "trained.safetensors")
    from safetensors.torch import load_file

    assert all("lora_" in name and ".layers.1." in name for name in load_file(str(saved)))
    final = trained_tensors(out / "final")
    assert set(final) == set(start)  # merged: a plain model folder, no adapter tensors
    changed = [k for k in final if not (final[k] == start[k]).all()]
    assert changed and all(".layers.1." in k and k.endswith("proj.weight") for k in changed)
    reloaded = load_local_model(out / "final")
    assert reloaded.model.config.num_hidden_layers == 2

    assert main(["train", "grpo", "--config", str(config_file), "--resume", "--max-steps", "2"]) == 0
    assert [json.loads(line)["step"] for line in (out / "rewards.jsonl").read_text().splitlines()] == [1, 2]


def test_openai_rollouts_through_serve_policy_record_tokens_and_sync_weights(tiny, tmp_path, sample_dir, likelihood_reward):
    import torch

    from training.grpo import train_grpo

    served = Served(tiny)
    try:
        config = job(tmp_path, tiny, rollout_backend="openai", base_url=served.base_url, weight_sync="serve-policy")
        tasks_dir = tmp_path / "t"
        from graph.tasks import make_tasks

        groups = run_groups(make_tasks(tasks_dir, 1, seed=7), 2, config.graph_overrides(), tmp_path / "runs",
                            config.rewards, workers=2)
        turns = [t for r in groups[0] for t in r.turns]
        assert turns and all(t.prompt_ids and t.logprobs is not None and len(t.logprobs) == len(t.token_ids) for t in turns)

        summary = train_grpo(config)
        assert summary["steps"] == 1 and math.isfinite(summary["history"][0]["loss"])
        synced = Path(config.output_dir) / "sync" / "model.safetensors"
        assert synced.is_file()
        from safetensors.torch import load_file, save_file

        zeros = {k: torch.zeros_like(v) for k, v in load_file(str(synced)).items()}
        (tmp_path / "zero").mkdir()
        save_file(zeros, str(tmp_path / "zero" / "model.safetensors"))
        answer = httpx.post(served.base_url.removesuffix("/v1") + "/v1/load_weights", json={"path": str(tmp_path / "zero")}, timeout=30)
        assert answer.status_code == 200 and answer.json()["tensors"] == len(zeros)
        bad = httpx.post(served.base_url.removesuffix("/v1") + "/v1/load_weights", json={"path": str(tmp_path)}, timeout=30)
        assert bad.status_code == 400 and "safetensors" in bad.json()["error"]["message"]
    finally:
        served.stop()


def test_shipped_grpo_configs_parse_and_build_trls_config():
    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    paths = sorted(root.glob("grpo_*.yaml"))
    assert paths
    for path in paths:
        config = GRPOJobConfig.from_yaml(path)
        args = config.to_trl()
        assert args.num_generations == config.num_generations and args.beta == config.beta
        assert config.graph_overrides()["temperature"] == 1.0 and config.graph_overrides()["record_token_ids"]


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(GRPOConfigError, match="base_url"):
        GRPOJobConfig.from_dict(dict(output_dir="x", rollout_backend="openai"))
    with pytest.raises(GRPOConfigError, match="num_generations"):
        GRPOJobConfig.from_dict(dict(output_dir="x", num_generations=1))
    with pytest.raises(GRPOConfigError, match="pass_qualty"):
        GRPOJobConfig.from_dict(dict(output_dir="x", graph={"pass_qualty": 4}))
    with pytest.raises(GRPOConfigError, match="lora.r needs rollout_backend local"):
        GRPOJobConfig.from_dict(dict(output_dir="x", rollout_backend="openai", base_url="http://127.0.0.1:1/v1", lora_r=8))
    with pytest.raises(GRPOConfigError, match="scale_rewards"):
        GRPOJobConfig.from_dict(dict(output_dir="x", scale_rewards="mean"))
    with pytest.raises(GRPOConfigError, match="rejected_turn_advantage"):
        GRPOJobConfig.from_dict(dict(output_dir="x", rejected_turn_advantage=-1.0))
    with pytest.raises(GRPOConfigError, match="refusal_credit"):
        GRPOJobConfig.from_dict(dict(output_dir="x", refusal_credit="last"))
    with pytest.raises(GRPOConfigError, match="negative_advantage_scale"):
        GRPOJobConfig.from_dict(dict(output_dir="x", negative_advantage_scale=1.5))
    with pytest.raises(GRPOConfigError, match="validation_seed"):
        GRPOJobConfig.from_dict(dict(output_dir="x", validation_tasks=2, validation_seed=0))
    with pytest.raises(GRPOConfigError, match="validate_every"):
        GRPOJobConfig.from_dict(dict(output_dir="x", validation_tasks=2, validate_every=0))
    (tmp_path / "c.yaml").write_text("output_dir: x\nlearning_rat: 1\n")
    with pytest.raises(GRPOConfigError, match="learning_rat"):
        GRPOJobConfig.from_yaml(tmp_path / "c.yaml")


def test_selector_keeps_the_strictly_best_policy_and_survives_a_checkpoint(tmp_path):
    import torch

    from training.grpo_selection import CheckpointSelector

    model = tiny_llama(layers=1)
    for name, p in model.named_parameters():
        p.requires_grad = "layers.0.mlp" in name
    start = {k: v.clone() for k, v in model.state_dict().items()}
    selector = CheckpointSelector()
    summary = lambda reward: {"reward_mean": reward, "reward_std": 0.1}
    assert selector.offer(0, summary(1.0), model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not selector.offer(5, summary(0.9), model) and not selector.offer(6, summary(1.0), model)  # a tie stays
    assert selector.restore_best(model) == 0
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    better = {k: v.clone() for k, v in model.state_dict().items()}
    assert selector.offer(8, summary(1.2), model)
    record = selector.save(tmp_path)
    reloaded = CheckpointSelector.load(tmp_path, json.loads(json.dumps(record)))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    assert reloaded.restore_best(model) == 8 and [r["best_step"] for r in reloaded.history] == [0, 0, 0, 8]
    assert all(torch.equal(v, better[k]) for k, v in model.state_dict().items())
    assert CheckpointSelector.load(tmp_path, None).restore_best(model) is None


def test_validation_scores_the_start_and_every_n_steps_keeps_the_best_and_resumes(tiny, tmp_path, sample_dir,
                                                                                  likelihood_reward):
    import shutil

    from training.grpo import make_task_sets, make_validation_tasks

    tiny_copy = tmp_path / "tiny"
    shutil.copytree(tiny, tiny_copy)
    start = trained_tensors(tiny_copy)
    config_file = tmp_path / "grpo.yaml"
    fields = {**job(tmp_path, tiny_copy).to_dict(), "lora_r": 2, "lora_alpha": 4.0, "learning_rate": 0.05,
              "max_steps": 3, "validation_tasks": 1, "validate_every": 2}
    config_file.write_text(yaml.safe_dump(fields))
    assert main(["train", "grpo", "--config", str(config_file), "--max-steps", "2"]) == 0
    out = Path(fields["output_dir"])
    config = GRPOJobConfig.from_dict(fields)
    validation = make_validation_tasks(config, tmp_path / "t")
    train, heldout = make_task_sets(config, tmp_path / "t")
    assert {t.image for t in validation}.isdisjoint({t.image for t in train} | {t.image for t in heldout})
    steps = [json.loads(line)["step"] for line in (out / "validation.jsonl").read_text().splitlines()]
    assert steps == [0, 0, 2, 2]  # the start, then every 2 steps, eval_generations rollouts each
    assert main(["train", "grpo", "--config", str(config_file), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "validation.jsonl").read_text().splitlines()]
    assert steps == [0, 0, 2, 2, 3, 3]  # resumed: the last step (max_steps) is scored, nothing twice
    summary = json.loads((out / "grpo_summary.json").read_text())
    rewards = [row["reward_mean"] for row in summary["validation"]]
    assert [row["step"] for row in summary["validation"]] == [0, 2, 3]
    assert all(isinstance(row["seconds"], float) and row["seconds"] >= 0 for row in summary["validation"])  # kept across the resume: the time reserve
    assert summary["selected_step"] == [0, 2, 3][rewards.index(max(rewards))]  # the first of the best
    changed = [k for k, v in trained_tensors(out / "final").items() if not (v == start[k]).all()]
    assert (summary["selected_step"] == 0) == (not changed)  # the start kept: final/ is the start model
    assert (out / "reward_curve.png").stat().st_size > 1000


def test_eval_grpo_pairs_two_policies_on_another_heldout_set(tiny, tmp_path, sample_dir, capsys):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny, twin)  # the same weights in another folder: its own model object and caches
    config_file = tmp_path / "grpo.yaml"
    config_file.write_text(yaml.safe_dump(job(tmp_path, tiny).to_dict()))
    out = tmp_path / "compare"
    assert main(["eval", "grpo", "--config", str(config_file), "--before", str(tiny), "--after", str(twin),
                 "--heldout-seed", "1", "--output-dir", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((out / "grpo_compare.json").read_text())
    assert summary["heldout_seed"] == 1 and summary["before"]["rollouts"] == 2 == summary["after"]["rollouts"]
    assert summary["paired"]["mean"] == 0.0  # same weights, same tasks and seeds: the same rollouts
    assert lines[-1] == (f"grpo reward_before {summary['before']['reward_mean']:.4f} "
                         f"reward_after {summary['after']['reward_mean']:.4f}")
    assert len((out / "heldout_after.jsonl").read_text().splitlines()) == 2


def test_eval_grpo_pairs_several_after_policies_with_one_before_run(tiny, tmp_path, sample_dir, capsys):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tiny, twin)
    config_file = tmp_path / "grpo.yaml"
    config_file.write_text(yaml.safe_dump(job(tmp_path, tiny).to_dict()))
    out = tmp_path / "compare"
    assert main(["eval", "grpo", "--config", str(config_file), "--before", str(tiny), "--after", str(twin),
                 str(tiny), "--output-dir", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads((out / "grpo_compare.json").read_text())
    assert [(a["label"], a["model"]) for a in summary["afters"]] == [("after", str(twin)), ("after2", str(tiny))]
    assert summary["after"] == summary["afters"][0]["result"] and summary["paired"] == summary["afters"][0]["paired"]
    assert all(a["paired"]["mean"] == 0.0 and a["result"]["rollouts"] == 2 for a in summary["afters"])
    assert sorted(p.name for p in out.glob("heldout_*.jsonl")) == [
        "heldout_after.jsonl", "heldout_after2.jsonl", "heldout_before.jsonl"]
    assert f"after2: {tiny}" in lines and lines.count(f"after: {twin}") == 1
    assert lines[-1] == (f"grpo reward_before {summary['before']['reward_mean']:.4f} "
                         f"reward_after {summary['afters'][1]['result']['reward_mean']:.4f}")
    from graph.inference import load_local_model

    assert load_local_model(tiny).prefix_cache_size == 0 == load_local_model(twin).prefix_cache_size  # caches freed


def test_bench_grpo_update_prints_kl_and_gain_per_setting(tiny, tmp_path, sample_dir, likelihood_reward, capsys):
    import shutil

    tiny_copy = tmp_path / "tiny"
    shutil.copytree(tiny, tiny_copy)
    config_file = tmp_path / "grpo.yaml"
    config_file.write_text(yaml.safe_dump(job(tmp_path, tiny_copy).to_dict()))
    assert main(["bench", "grpo-update", "--config", str(config_file), "--settings", "full:1e-2,lora2:1e-1",
                 "--updates", "2", "--out", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│ full") or line.startswith("│ lora2")]
    assert len(rows) == 4  # two settings x two updates
    kls = [float(row.split("│")[4]) for row in rows]
    assert all(math.isfinite(k) and k >= 0 for k in kls) and max(kls) > 0  # the updates moved the policy
    with pytest.raises(SystemExit, match="unknown setting"):
        main(["bench", "grpo-update", "--config", str(config_file), "--settings", "adam:1e-3"])


def test_bench_rollouts_times_one_round_per_decoding_mode_on_the_same_seeds(tiny, tmp_path, sample_dir, capsys):
    import shutil

    tiny_copy = tmp_path / "tiny"  # its own LocalModel: the modes switch batching on the loaded model
    shutil.copytree(tiny, tiny_copy)
    config_file = tmp_path / "grpo.yaml"
    config_file.write_text(yaml.safe_dump({**job(tmp_path, tiny_copy).to_dict(), "temperature": 0.0}))
    assert main(["bench", "rollouts", "--config", str(config_file), "--out", str(tmp_path / "bench")]) == 0
    rows = [line.split("│") for line in capsys.readouterr().out.splitlines() if line.startswith(("│ one", "│ batched"))]
    assert [r[1].strip() for r in rows] == ["one", "batched"]
    assert all(float(r[2]) >= 0 and int(r[3]) == 2 and int(r[4]) > 0 for r in rows)  # a fast round prints 0.0 s
    assert all(r[7].strip() == "2/2" for r in rows)  # greedy: every mode generated the same tokens
    with pytest.raises(SystemExit, match="unknown mode"):
        main(["bench", "rollouts", "--config", str(config_file), "--modes", "fast"])

"""The three GRPO rewards of DESIGN §6, computed from a finished graph run: task, reflection, behaviour.

    R = w_task * task + w_reflection * reflection + w_behaviour * behaviour

* task: the final QE score / 10 (0 when the run returned no evaluated image), mixed with the IoU of the
  final mask against the generator's change region (the embedded image engine reports where it drew,
  which is a ground truth) with weight `mask_iou_weight`.
* reflection: sum over successive image_gen attempts of max(0, S_m - S_{m-1}) / 10, where S_m is the QE
  score of the m-th evaluated attempt: a retry that fixes what QE named is paid, a worse one is not punished.
* behaviour: the mean of three checks, each in [0, 1] - the share of valid turns (one validating call, or
  a final answer after mask_gen), protocol order (`graph.protocol.follows_protocol`: PG first, KR only
  after a failed QE, MG last and only after a pass) and whether the policy masked its own image - minus
  `over_budget_penalty` per call over budget (image_gen refused for budget; running out of steps counts one)
  and `repeated_call_penalty` per repeated call: a quality_eval, mask_gen or knowledge_retrieval that ran
  with the same arguments as one that already ran. Those tools answer the same thing twice, so a repeat
  only spends a step. Why: without it a policy can learn to call quality_eval on its passed image until
  the steps run out, never masking; every turn is valid and in protocol order, the finalize step makes
  the mask, and such a loop can score above a policy that finishes properly.

Why the eval's measures: a reward that disagreed with `anomaly-agent eval policy` would train the policy
towards a different target than the one it is judged on. Every function here is pure over the run's
output and trajectory record, so a malformed run (no calls, garbage text) gets low numbers, never an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from graph.protocol import RunMetrics, is_budget_refusal, measure_run, repeated_call_turns


@dataclass(frozen=True)
class RewardWeights:
    """The weights of R and its sub-terms (set in the GRPO config)."""

    task: float = 1.0
    reflection: float = 1.0
    behaviour: float = 0.5
    mask_iou_weight: float = 0.0
    over_budget_penalty: float = 0.1
    repeated_call_penalty: float = 0.1


@dataclass(frozen=True)
class RewardBreakdown:
    """One rollout's reward and every component, as logged per rollout."""

    total: float
    task: float
    reflection: float
    behaviour: float
    score: float
    mask_iou: float | None
    valid_turns: float
    protocol: bool
    masked_by_policy: bool
    over_budget: int
    repeated_calls: int
    image_gens: int
    status: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_reward(result: dict[str, Any], mask_iou_weight: float = 0.0) -> tuple[float, float | None]:
    """(task reward, mask IoU or None) from a run's ``result``."""
    score = float(result.get("score") or 0.0) / 10.0
    iou = result.get("mask_iou")
    if iou is None or mask_iou_weight <= 0:
        return score, None if iou is None else float(iou)
    return (1 - mask_iou_weight) * score + mask_iou_weight * float(iou), float(iou)


def reflection_reward(evaluations: dict[str, dict[str, Any]]) -> float:
    """Sum of score gains between successive evaluated attempts (in image order), / 10."""
    scores = [float(e["location"]) + float(e["quality"]) for _, e in sorted(evaluations.items(), key=lambda kv: int(kv[0]))]
    return sum(max(0.0, b - a) for a, b in zip(scores, scores[1:])) / 10.0


def over_budget_calls(messages: list[Any], status: str) -> int:
    """Calls the graph refused for budget, plus one when the run ran out of steps."""
    refused = sum(is_budget_refusal(m) for m in messages)
    return refused + (status == "budget_exhausted")


def repeated_calls(messages: list[Any]) -> int:
    """Executed calls of the tools that answer the same arguments the same way, repeating an earlier one
    (`graph.protocol.repeated_call_turns`; GRPO gives such a turn no positive credit)."""
    return sum(repeated_call_turns(messages))


@dataclass(frozen=True)
class RunFacts:
    """What the reward functions read from one finished run (computed once per rollout)."""

    result: dict[str, Any]
    evaluations: dict[str, dict[str, Any]]
    metrics: RunMetrics
    valid_share: float
    over_budget: int
    repeated_calls: int


#: A named reward function: (name, its weight in R, the function of a run's facts).
RewardFunction = tuple[str, float, Callable[[RunFacts], float]]


def reward_functions(weights: RewardWeights) -> list[RewardFunction]:
    """DESIGN §6's three rewards with their weights, in the order R sums them (TRL's ``reward_funcs``)."""

    def task(facts: RunFacts) -> float:
        return task_reward(facts.result, weights.mask_iou_weight)[0]

    def reflection(facts: RunFacts) -> float:
        return reflection_reward(facts.evaluations)

    def behaviour(facts: RunFacts) -> float:
        metrics = facts.metrics
        checks = (facts.valid_share + float(metrics.protocol) + float(metrics.masked_by_policy)) / 3.0
        return checks - (weights.over_budget_penalty * facts.over_budget
                         + weights.repeated_call_penalty * facts.repeated_calls)

    return [("task", weights.task, task), ("reflection", weights.reflection, reflection),
            ("behaviour", weights.behaviour, behaviour)]


def run_facts(output: dict[str, Any], record: dict[str, Any], *, max_steps: int, max_image_gens: int) -> RunFacts:
    """The facts of one finished run from the graph's output and its trajectory record."""
    metrics = measure_run(output, record, max_steps, max_image_gens, 0.0)
    messages = output.get("messages") or []
    return RunFacts(result=output.get("result") or {}, evaluations=record.get("evaluations") or {}, metrics=metrics,
                    valid_share=metrics.valid_turns / metrics.turns if metrics.turns else 0.0,
                    over_budget=over_budget_calls(messages, metrics.status), repeated_calls=repeated_calls(messages))


def score_rollout(output: dict[str, Any], record: dict[str, Any], *, max_steps: int, max_image_gens: int,
                  weights: RewardWeights) -> RewardBreakdown:
    """The reward of one finished run from the graph's output and its trajectory record (see module doc)."""
    facts = run_facts(output, record, max_steps=max_steps, max_image_gens=max_image_gens)
    components = {name: function(facts) for name, _, function in reward_functions(weights)}
    total = sum(weight * components[name] for name, weight, _ in reward_functions(weights))
    metrics = facts.metrics
    return RewardBreakdown(
        total=total, task=components["task"], reflection=components["reflection"], behaviour=components["behaviour"],
        score=metrics.score, mask_iou=task_reward(facts.result, weights.mask_iou_weight)[1],
        valid_turns=facts.valid_share, protocol=metrics.protocol, masked_by_policy=metrics.masked_by_policy,
        over_budget=facts.over_budget, repeated_calls=facts.repeated_calls,
        image_gens=int(facts.result.get("image_gens") or 0), status=metrics.status,
    )

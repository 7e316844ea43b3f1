"""GRPO rollouts: G runs per task through the real graph, with the tokens the policy generated (DESIGN §6).

Why the real graph: the policy must learn in the loop users run and serve (`graph.graph.build_graph`),
with the same tool nodes, error observations and budget. The policy is the graph's own `local` policy
(this process's model, which the trainer updates in place) or its `openai` policy (a vLLM or
serve-policy endpoint), with ``record_token_ids`` on: every assistant message then carries the prompt ids
it was generated from, the generated ids as sampled, and their log-probabilities under the sampling
policy (the "old" log-probabilities of the clipped ratio). Nothing is re-tokenised.

Concurrency: the G x tasks runs of a round go to a thread pool. Against a server the requests are
concurrent (vLLM batches them); on the local backend they share one model, and with batching on
(`LocalModel.enable_batching`) each rollout registers as a client of its `BatchScheduler`, so the
replies the threads ask for at about the same time are decoded as one batch; the prefix cache of
`LocalModel.enable_prefix_cache` lets each row read only what is new since its conversation's last turn.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage

from graph.configuration import Configuration
from graph.protocol import message_text, repeated_call_turns, turns_accepted
from graph.tasks import Task
from training.grpo_rewards import RewardBreakdown, RewardWeights, score_rollout

if TYPE_CHECKING:
    from graph.inference import BatchScheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    """One policy turn as generated: its prompt ids, the sampled ids, their sampling log-probabilities, and
    whether the graph took it (`graph.protocol.turns_accepted`: a valid call not answered with an error)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    accepted: bool = True
    repeats: bool = False  # its call repeated an earlier quality_eval / mask_gen / knowledge_retrieval exactly


@dataclass
class Rollout:
    """One graph run of a group: its reward (every component) and the policy's turns."""

    task: Task
    group: int
    member: int
    seed: int
    reward: RewardBreakdown
    turns: list[Turn] = field(default_factory=list)
    untracked_turns: int = 0
    seconds: float = 0.0
    error: str | None = None
    thoughts: list[str] = field(default_factory=list)  # the text before each turn's call, for `top_thought_share`

    @property
    def rejected_turns(self) -> int:
        """Turns of this run the graph refused (see `Turn.accepted`)."""
        return sum(not t.accepted for t in self.turns)

    def log_row(self) -> dict[str, Any]:
        return {"category": self.task.category, "anomaly_type": self.task.anomaly_type, "group": self.group,
                "member": self.member, "seed": self.seed, **self.reward.as_dict(), "turns": len(self.turns),
                "rejected_turns": self.rejected_turns,
                "untracked_turns": self.untracked_turns, "generated_tokens": sum(len(t.token_ids) for t in self.turns),
                "seconds": round(self.seconds, 2), "error": self.error}


def turns_from_messages(messages: list[Any]) -> tuple[list[Turn], int]:
    """The recorded turns of a run, and how many assistant turns had no token record (not trainable)."""
    turns: list[Turn] = []
    untracked = 0
    assistant = [m for m in messages if isinstance(m, AIMessage)]
    for message, accepted, repeats in zip(assistant, turns_accepted(messages), repeated_call_turns(messages)):
        meta = message.response_metadata or {}
        ids, prompt = meta.get("token_ids"), meta.get("prompt_token_ids")
        if not ids or not prompt:
            untracked += 1
            continue
        logprobs = meta.get("logprobs")
        if logprobs is not None and len(logprobs) != len(ids):
            logprobs = None
        turns.append(Turn(list(prompt), list(ids), list(logprobs) if logprobs is not None else None, accepted, repeats))
    return turns, untracked


def run_one(agent: Any, task: Task, *, group: int, member: int, seed: int, run_dir: Path, config: Configuration,
            weights: RewardWeights) -> Rollout:
    """One rollout under `config` (the run's context); a run that fails in any way is scored as what it is
    (low), never raised."""
    from graph.graph import recursion_limit

    started = time.perf_counter()
    error = None
    try:
        output = agent.invoke(
            {"image": task.image, "category": task.category, "anomaly_type": task.anomaly_type, "seed": seed,
             "run_dir": str(run_dir)},
            {"recursion_limit": recursion_limit(config)},
            context=config,
        )
    except Exception as exc:  # a crashed run is a zero-reward sample, not a crashed training run
        logger.warning("rollout %s/%s seed %d failed: %s", task.category, task.anomaly_type, seed, exc)
        output, error = {"messages": [], "result": {}, "status": "crashed"}, f"{type(exc).__name__}: {exc}"
    result = output.get("result") or {}
    record: dict[str, Any] = {}
    if result.get("trajectory_path") and Path(result["trajectory_path"]).is_file():
        record = json.loads(Path(result["trajectory_path"]).read_text())
    budget = config.budget
    reward = score_rollout(output, record, max_steps=budget.max_steps, max_image_gens=budget.max_image_gens, weights=weights)
    messages = output.get("messages") or []
    turns, untracked = turns_from_messages(messages)
    thoughts = [message_text(m).strip() for m in messages if isinstance(m, AIMessage)]
    return Rollout(task, group, member, seed, reward, turns, untracked, time.perf_counter() - started,
                   error or result.get("error"), thoughts)


def run_groups(tasks: list[Task], group_size: int, overrides: dict[str, Any], work_dir: Path, weights: RewardWeights, *,
               workers: int = 4, progress: bool = False, desc: str = "rollouts") -> list[list[Rollout]]:
    """`group_size` rollouts of each task through the real graph; groups in task order, members in seed order.

    Member g of task t runs with seed ``t.seed * 100 + g``: the policy's sampling seed per turn and the
    tools' seeds derive from it, so a group's members differ and a rerun repeats them.
    """
    from graph.graph import build_graph
    from graph.policies import check_policy

    cfg = Configuration.load(overrides=overrides)
    check_policy(cfg)  # load the model (or reach the endpoint) once, before the threads ask for it
    agent = build_graph()
    jobs = [(t, g, m) for g, t in enumerate(tasks) for m in range(group_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=desc, unit="run")

    batcher = local_batcher(overrides)
    slot = batcher.client if batcher is not None else nullcontext
    # Every thread of the first wave counts as a client from the start, so the first turns batch too.
    reservation = batcher.reserve(min(max(1, workers), len(jobs))) if batcher is not None else nullcontext()

    def job(item: tuple[Task, int, int]) -> Rollout:
        task, group, member = item
        with slot():
            rollout = run_one(agent, task, group=group, member=member, seed=task.seed * 100 + member,
                              run_dir=work_dir / f"g{group:03d}-m{member:02d}", config=cfg, weights=weights)
        if bar is not None:
            bar.update(1)
        return rollout

    with reservation, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = list(pool.map(job, jobs))
    if bar is not None:
        bar.close()
    return [done[i * group_size:(i + 1) * group_size] for i in range(len(tasks))]


def local_batcher(overrides: dict[str, Any]) -> BatchScheduler | None:
    """The local model's batch scheduler when rollouts use the local policy with batching on, else None.

    Why: the scheduler waits for every active rollout's request before decoding a batch, so it must know
    which threads are rollouts (and when one has ended and will ask no more).
    """
    if overrides.get("policy") != "local":
        return None
    from graph.inference import load_local_model

    return load_local_model(overrides.get("model")).batcher


def reward_summary(groups: list[list[Rollout]]) -> dict[str, Any]:
    """Mean reward, its spread (over all rollouts, and within groups: the G-rollout spread), the components."""
    rollouts = [r for g in groups for r in g]
    totals = [r.reward.total for r in rollouts]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else 0.0

    return {
        "rollouts": len(rollouts),
        "reward_mean": mean(totals),
        "reward_std": statistics.pstdev(totals) if len(totals) > 1 else 0.0,
        "group_std_mean": mean([statistics.pstdev([r.reward.total for r in g]) for g in groups if len(g) > 1]),
        "group_means": [round(mean([r.reward.total for r in g]), 4) for g in groups],
        "totals": [round(t, 5) for t in totals],  # in (task, member) order: pairs with another run on the same seeds
        "task": mean([r.reward.task for r in rollouts]),
        "reflection": mean([r.reward.reflection for r in rollouts]),
        "behaviour": mean([r.reward.behaviour for r in rollouts]),
        "score": mean([r.reward.score for r in rollouts]),
        "valid_turns": mean([r.reward.valid_turns for r in rollouts]),
        "rejected_turns": mean([float(r.rejected_turns) for r in rollouts]),
        "protocol": mean([float(r.reward.protocol) for r in rollouts]),
        "masked_runs": mean([float(r.reward.masked_by_policy) for r in rollouts]),
        "repeated_calls": sum(r.reward.repeated_calls for r in rollouts),
        "top_thought_share": top_thought_share([t for r in rollouts for t in r.thoughts]),
        "seconds_per_rollout": mean([r.seconds for r in rollouts]),
    }


def top_thought_share(thoughts: list[str]) -> float:
    """The share of the policy's turns that wrote the most common thought (0 when there are none).

    Why: a policy whose thoughts collapse to one phrase ("Image 2.") no longer says in its context what it
    has done, and starts looping (mask_gen after mask_gen), while its reward can still look normal for a
    few steps; this share rises well before the reward falls (figures in RESULTS.md).
    """
    if not thoughts:
        return 0.0
    return max(Counter(thoughts).values()) / len(thoughts)


def paired_difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float] | None:
    """Mean of after - before over rollouts paired by task and seed, with its standard error.

    Why paired: both evaluations run the same tasks with the same run seeds, so much of the spread
    between tasks cancels; the standard error says whether a change in the mean is more than sampling
    noise (a difference under about two standard errors is not evidence of a change).
    """
    a, b = before.get("totals") or [], after.get("totals") or []
    if len(a) != len(b) or len(a) < 2:
        return None
    diffs = [y - x for x, y in zip(a, b)]
    sd = statistics.stdev(diffs)
    return {"mean": statistics.fmean(diffs), "std": sd, "se": sd / len(diffs) ** 0.5, "pairs": len(diffs)}

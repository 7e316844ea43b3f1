"""`anomaly-agent eval policy`: how well a policy drives the agent, on N sampled tasks through the real graph.

Why these measures: before a policy's images are worth judging, it has to speak the protocol. An
untrained or badly served model fails first at the format (no parseable call), then at the order of
calls, then at finishing the job (masking its own image); only then does the image score say much. The
scripted expert scores 1.0 on format and protocol, so it is the sanity reference.

Measures (per run, then averaged over runs; turns are pooled over all runs):
    valid_turns  share of assistant turns that are either exactly one tool call that validates (known
                 tool, arguments matching its schema) or a proper final answer: non-empty text, no
                 call-like text that failed to parse, given after the policy's mask_gen ran (the only
                 point where the protocol ends; prose instead of a first call is not an answer).
    protocol     share of runs that follow the protocol; see `follows_protocol`.
    masked_runs  share of runs whose final mask was made by the policy's own mask_gen call
                 (``result.mask_by == "policy"``), not filled in by finalize.
    score        mean final QE score (location + quality, 0-10); a run without an evaluated final
                 image counts 0, so a policy cannot look better by never evaluating.
    steps        mean tool calls per run (invalid ones included, as the budget counts them).

The last line printed is ``policy valid_turns <x> protocol <p> masked_runs <y> score <s>``.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.messages import AIMessage, AnyMessage, ToolMessage

from graph.tool_calls import ValidCall, validate_call

logger = logging.getLogger(__name__)

#: A continuation after a failed image needs image_gen + quality_eval + mask_gen.
STEPS_FOR_RETRY = 3


@dataclass(frozen=True)
class Task:
    image: str
    category: str
    anomaly_type: str
    seed: int


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
    status: str
    turns: int
    valid_turns: int
    protocol: bool
    masked_by_policy: bool
    score: float
    steps: int
    seconds: float
    error: str | None = None


# --------------------------------------------------------------------------------------------- tasks


def make_tasks(folder: Path, count: int, seed: int = 0, size: int = 128) -> list[Task]:
    """`count` tasks: sample images (tools.samples) × the catalog's defect types of their category.

    The pairs are shuffled with `seed` and taken in order (cycling when `count` is larger), so the same
    arguments always give the same tasks.
    """
    from tools.knowledge.catalog import load_catalog
    from tools.samples import make_samples

    if count < 1:
        raise ValueError("--tasks must be at least 1")
    catalog = load_catalog()
    samples = make_samples(folder, size=size, per_category=2, seed=seed)
    pairs = [
        (item["path"], item["category"], defect)
        for item in samples
        for defect in catalog.category(item["category"]).defects
    ]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [
        Task(pairs[order[i % len(pairs)]][0], pairs[order[i % len(pairs)]][1], pairs[order[i % len(pairs)]][2], seed * 1000 + i)
        for i in range(count)
    ]


# ---------------------------------------------------------------------------------------------- measures


def turn_is_valid(message: AIMessage, after_mask: bool = True) -> bool:
    """Exactly one tool call that validates, or a proper final answer (see the module docstring).

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


def turns_accepted(messages: list[AnyMessage]) -> list[bool]:
    """For each assistant turn in order: whether the graph took it (`turn_is_valid`, and its call not answered
    with an error, e.g. an image that does not exist or a budget refusal).

    Why stricter than `turn_is_valid`: a call can match its schema and still be one the run cannot use; the
    turn-level credit of GRPO (`training.grpo_loss`) pushes down exactly the turns the graph turned away.
    """
    answers = {m.tool_call_id: m for m in messages if isinstance(m, ToolMessage)}
    accepted: list[bool] = []
    masked = False
    for message in messages:
        if isinstance(message, ToolMessage):
            masked = masked or (message.name == "mask_gen" and not _is_error(message))
        elif isinstance(message, AIMessage):
            ok = turn_is_valid(message, after_mask=masked)
            if ok and message.tool_calls:
                answer = answers.get(message.tool_calls[0].get("id") or "")
                ok = answer is not None and not _is_error(answer)
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
            if isinstance(checked, ValidCall) and answer is not None and not _is_error(answer):
                calls.append(ExecutedCall(checked.name, checked.args.model_dump(), steps, gens, turn))
                gens += checked.name == "image_gen"
        steps += 1
    return calls


def follows_protocol(
    calls: list[ExecutedCall], evaluations: dict[str, dict[str, Any]], max_steps: int, max_image_gens: int
) -> bool:
    """Whether a run's executed calls follow DESIGN §6's protocol.

    Precisely, all of:
      1. at least one call ran, and the first was prompt_gen;
      2. each knowledge_retrieval came after a quality_eval, and the latest quality_eval before it failed;
      3. nothing ran after the first mask_gen (MG last);
      4. mask_gen's image had passed an earlier quality_eval - unless no further attempt fitted the budget
         at that point (all image_gen calls used, or fewer than 3 steps left), in which case it must be
         the best-scored image evaluated so far (the latest generated one if none was evaluated).
    Invalid calls and calls answered with an error are not counted here (`valid_turns` measures them).
    """
    if not calls or calls[0].name != "prompt_gen":
        return False
    last_eval_passed: bool | None = None
    evaluated: dict[int, float] = {}
    passed: set[int] = set()
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
            evaluated[number] = float(evaluation["location"]) + float(evaluation["quality"])
            if last_eval_passed:
                passed.add(number)
        elif call.name == "knowledge_retrieval":
            if last_eval_passed is not False:
                return False
        elif call.name == "mask_gen":
            if index != len(calls) - 1:
                return False
            number = int(call.args["image"])
            if number in passed:
                continue
            out_of_budget = call.image_gens_before >= max_image_gens or max_steps - call.steps_before < STEPS_FOR_RETRY
            if not out_of_budget:
                return False
            if evaluated:
                best = max(evaluated, key=lambda n: (evaluated[n], n))
            else:
                best = generated[-1] if generated else -1
            if number != best:
                return False
    return True


def measure_run(output: dict[str, Any], record: dict[str, Any], max_steps: int, max_image_gens: int, seconds: float) -> RunMetrics:
    """The metrics of one finished run from the graph's output and its trajectory record."""
    messages = output.get("messages") or []
    turns = [m for m in messages if isinstance(m, AIMessage)]
    result = output.get("result") or {}
    calls = executed_calls(messages)
    valid = 0
    masked = False
    for message in messages:
        if isinstance(message, AIMessage):
            valid += turn_is_valid(message, after_mask=masked)
        elif isinstance(message, ToolMessage) and message.name == "mask_gen" and not _is_error(message):
            masked = True
    return RunMetrics(
        status=str(output.get("status")),
        turns=len(turns),
        valid_turns=valid,
        protocol=follows_protocol(calls, record.get("evaluations") or {}, max_steps, max_image_gens),
        masked_by_policy=result.get("mask_by") == "policy",
        score=float(result.get("score") or 0.0),
        steps=int(result.get("steps") or 0),
        seconds=seconds,
        error=result.get("error"),
    )


def summarise(runs: list[RunMetrics]) -> dict[str, Any]:
    """Averages over runs (turn validity pooled over all turns)."""
    turns = sum(r.turns for r in runs)
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run.status] = statuses.get(run.status, 0) + 1
    return {
        "runs": len(runs),
        "turns": turns,
        "valid_turns": sum(r.valid_turns for r in runs) / turns if turns else 0.0,
        "protocol": statistics.fmean(r.protocol for r in runs) if runs else 0.0,
        "masked_runs": statistics.fmean(r.masked_by_policy for r in runs) if runs else 0.0,
        "score": statistics.fmean(r.score for r in runs) if runs else 0.0,
        "steps": statistics.fmean(r.steps for r in runs) if runs else 0.0,
        "seconds_per_run": statistics.fmean(r.seconds for r in runs) if runs else 0.0,
        "statuses": statuses,
        "errors": sorted({r.error for r in runs if r.error}),
    }


def last_line(summary: dict[str, Any]) -> str:
    return (
        f"policy valid_turns {summary['valid_turns']:.3f} protocol {summary['protocol']:.3f} "
        f"masked_runs {summary['masked_runs']:.3f} score {summary['score']:.2f}"
    )


# ------------------------------------------------------------------------------------------------ run


def evaluate_policy(overrides: dict[str, Any], tasks: int, seed: int = 0, size: int = 128, progress: bool = False) -> dict[str, Any]:
    """Run `tasks` tasks through the graph with the configured policy; return `summarise`'s dict."""
    import json

    from graph.configuration import Configuration
    from graph.graph import build_graph, recursion_limit
    from graph.policies import check_policy

    cfg = Configuration.load(overrides=overrides)
    check_policy(cfg)  # a dead endpoint or missing model folder fails here, once, not in every run
    agent = build_graph()
    runs: list[RunMetrics] = []
    with tempfile.TemporaryDirectory(prefix="policy-eval-") as tmp:
        work = Path(tmp)
        todo = make_tasks(work / "samples", tasks, seed=seed, size=size)
        iterator: Any = todo
        if progress:
            from tqdm import tqdm

            iterator = tqdm(todo, desc="eval policy", unit="task")
        for index, task in enumerate(iterator):
            started = time.perf_counter()
            output = agent.invoke(
                {"image": task.image, "category": task.category, "anomaly_type": task.anomaly_type,
                 "seed": task.seed, "run_dir": str(work / "runs" / f"{index:04d}")},
                {"configurable": dict(overrides), "recursion_limit": recursion_limit(cfg)},
            )
            seconds = time.perf_counter() - started
            result = output.get("result") or {}
            record = json.loads(Path(result["trajectory_path"]).read_text()) if result.get("trajectory_path") else {}
            run = measure_run(output, record, cfg.max_steps, cfg.max_image_gens, seconds)
            logger.info("task %d %s/%s: %s, %d turns (%d valid), protocol %s, %.1fs", index, task.category,
                        task.anomaly_type, run.status, run.turns, run.valid_turns, run.protocol, seconds)
            runs.append(run)
    return summarise(runs)


def format_table(summary: dict[str, Any], title: str) -> Any:
    """A rich table of the summary, for the CLI."""
    from evals.tables import measure_table

    rows = [
        ("runs", str(summary["runs"])),
        ("assistant turns", str(summary["turns"])),
        ("valid turns (tool call or final answer)", f"{summary['valid_turns']:.3f}"),
        ("protocol adherence (runs)", f"{summary['protocol']:.3f}"),
        ("runs masked by the policy", f"{summary['masked_runs']:.3f}"),
        ("mean final QE score (0-10)", f"{summary['score']:.2f}"),
        ("mean steps", f"{summary['steps']:.2f}"),
        ("mean seconds / run", f"{summary['seconds_per_run']:.2f}"),
        ("statuses", ", ".join(f"{k} {v}" for k, v in sorted(summary["statuses"].items()))),
        *(("error", error) for error in summary["errors"][:3]),
    ]
    return measure_table(title, rows)


def _is_error(answer: AnyMessage) -> bool:
    """Whether a tool answer is the graph's error observation (`graph.prompts` starts them with "Error:")."""
    return message_text(answer).startswith("Error:")


def message_text(message: AnyMessage) -> str:
    """A message's text, whether its content is a string or a list of parts."""
    content = message.content
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)

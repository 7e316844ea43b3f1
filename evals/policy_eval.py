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
    protocol     share of runs that follow the protocol; see `graph.protocol.follows_protocol`.
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
from pathlib import Path
from typing import Any

from graph.protocol import RunMetrics, measure_run
from graph.tasks import make_tasks

logger = logging.getLogger(__name__)

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
                context=cfg,
            )
            seconds = time.perf_counter() - started
            result = output.get("result") or {}
            record = json.loads(Path(result["trajectory_path"]).read_text()) if result.get("trajectory_path") else {}
            run = measure_run(output, record, cfg.budget.max_steps, cfg.budget.max_image_gens, seconds)
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

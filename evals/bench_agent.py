"""Benchmark: seconds per sample, where the time goes, and peak memory, for the agent on the CPU.

Run: ``anomaly-agent bench agent [--samples 12] [--size 256]``.

Why a baseline in the same process: absolute seconds depend on the machine; the ratio between the full
agent (graph, scripted policy, checkpoint-free state handling, trajectory writing) and the same tools
called directly once each (PG, IG, QE, MG: the open-loop pipeline) shows what the agent's loop and
bookkeeping cost, on whatever machine this runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("LANGSMITH_TRACING", "false")

CASES = [("metal_nut", "scratch"), ("metal_nut", "color"), ("tile", "crack"), ("tile", "oil"), ("capsule", "poke"), ("carpet", "thread")]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_agent(images: list[tuple[Path, str, str]], work: Path) -> list[dict]:
    from graph.configuration import Configuration
    from graph.graph import build_graph, recursion_limit

    agent = build_graph()
    limit = recursion_limit(Configuration())
    rows = []
    for i, (image, category, anomaly_type) in enumerate(images):
        started = time.perf_counter()
        state = agent.invoke(
            {"image": str(image), "category": category, "anomaly_type": anomaly_type, "seed": i, "run_dir": str(work / f"agent{i}")},
            {"recursion_limit": limit},
        )
        wall = time.perf_counter() - started
        timings = state["result"]["timings"]
        tools = sum(v for k, v in timings.items() if k != "policy")
        rows.append({"wall": wall, "tools": tools, "policy": timings.get("policy", 0.0), "steps": state["result"]["steps"],
                     "status": state["status"], **{f"t_{k}": v for k, v in timings.items()}})
    return rows


def run_direct(images: list[tuple[Path, str, str]]) -> list[float]:
    """The open-loop pipeline: each tool once, called directly, no graph."""
    from graph.configuration import Configuration
    from graph.toolbox import get_toolbox
    from tools.imaging import load_image
    from tools.knowledge.catalog import load_catalog
    from tools.types import EvaluationRequest, GenerationRequest, PromptRequest

    box = get_toolbox(Configuration())
    catalog = load_catalog()
    seconds = []
    for i, (image, category, anomaly_type) in enumerate(images):
        started = time.perf_counter()
        normal = load_image(image)
        entry = catalog.entry(category, anomaly_type)
        kind = catalog.category(category).kind == "texture"
        prompt = box.prompt.generate(PromptRequest(category=category, anomaly_type=anomaly_type, knowledge=[entry], seed=i))
        edited = box.image.generate(normal, GenerationRequest(prompt=prompt, category=category, anomaly_type=anomaly_type,
                                                              is_texture=kind, default_shape=entry.shape, seed=i)).image
        box.judge.evaluate(normal, edited, EvaluationRequest(category=category, anomaly_type=anomaly_type, prompt=prompt, is_texture=kind))
        box.mask.generate(normal, edited)
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    from evals.tables import measure_table
    from tools.samples import make_samples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        made = make_samples(work / "samples", size=args.size, per_category=2)
        by_category: dict[str, list[Path]] = {}
        for item in made:
            by_category.setdefault(item["category"], []).append(Path(item["path"]))
        images = [(by_category[c][i % len(by_category[c])], c, t) for i, (c, t) in
                  enumerate(CASES * (args.samples // len(CASES) + 1))][: args.samples]

        rss_start = _peak_rss_mb()
        started = time.perf_counter()
        run_agent(images[:1], work / "warmup")  # loads the embedder and the knowledge store
        warmup = time.perf_counter() - started
        agent = run_agent(images, work)
        direct = run_direct(images)
        rss_peak = _peak_rss_mb()

    wall = [r["wall"] for r in agent]
    total = sum(wall)
    tools_share = sum(r["tools"] for r in agent) / total
    policy_share = sum(r["policy"] for r in agent) / total
    rows = [
        ("median seconds / sample (agent)", f"{statistics.median(wall):.3f}"),
        ("p90 seconds / sample (agent)", f"{sorted(wall)[int(0.9 * (len(wall) - 1))]:.3f}"),
        ("median seconds / sample (direct tools, open loop)", f"{statistics.median(direct):.3f}"),
        ("agent / direct (median)", f"{statistics.median(wall) / statistics.median(direct):.2f}x"),
        ("mean tool calls / sample", f"{statistics.fmean(r['steps'] for r in agent):.1f}"),
        ("share inside tools", f"{100 * tools_share:.1f}%"),
        ("share in policy", f"{100 * policy_share:.1f}%"),
        ("share graph + I/O overhead", f"{100 * (1 - tools_share - policy_share):.1f}%"),
    ]
    for key in sorted(k for k in agent[0] if k.startswith("t_") and k != "t_policy"):
        rows.append((f"  {key[2:]} seconds / sample (mean)", f"{statistics.fmean(r.get(key, 0.0) for r in agent):.3f}"))
    rows += [
        ("first run incl. model loads (s)", f"{warmup:.2f}"),
        ("peak RSS (MB)", f"{rss_peak:.0f}"),
        ("RSS at start (MB)", f"{rss_start:.0f}"),
    ]
    title = f"anomaly-agent, embedded backends, {args.size}x{args.size}, {len(agent)} samples, 1 process"
    Console().print(measure_table(title, rows))


if __name__ == "__main__":
    main()

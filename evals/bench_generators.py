"""Benchmark: samples/s, time per stage and peak memory of the agent and of each baseline, in one process.

Run: ``anomaly-agent bench generators [--samples 12] [--size 128] [--reference open_loop]``.

Why one process and ratios: absolute seconds depend on the machine and its load; generators measured
side by side on the same images, in the same process, give ratios that carry over. The agent runs the
real graph (scripted policy, embedded backends) and reports its per-tool timings; each baseline reports
its own stages. One warm-up sample per generator (model and knowledge-store loads) is timed apart.

Memory: each generator runs a second, shorter pass under `tracemalloc`, whose peak covers Python and
numpy allocations (not torch's own allocator); the process's peak RSS is reported at the end. The timing
pass runs without tracemalloc, which slows Python code.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("LANGSMITH_TRACING", "false")

#: (category, type) cases cycled through: a texture and an object, a line, blob and deformation type each.
CASES = [
    ("tile", "crack"),
    ("metal_nut", "scratch"),
    ("tile", "oil"),
    ("metal_nut", "color"),
    ("tile", "rough"),
    ("metal_nut", "bent"),
]

Step = Callable[[int], dict[str, float]]


def agent_step(normals: list[tuple[Path, str, str]], work: Path) -> Step:
    """One agent run per call (the real graph); returns its per-tool seconds."""
    from graph.configuration import Configuration
    from graph.graph import build_graph, recursion_limit

    agent = build_graph()
    limit = recursion_limit(Configuration())

    def step(i: int) -> dict[str, float]:
        path, category, anomaly_type = normals[i % len(normals)]
        state = agent.invoke(
            {
                "image": str(path),
                "category": category,
                "anomaly_type": anomaly_type,
                "seed": i,
                "run_dir": str(work / f"agent{i}"),
            },
            {"recursion_limit": limit},
        )
        return dict(state["result"]["timings"])

    return step


def baseline_step(name: str, normals: list[tuple[Path, str, str]]) -> Step:
    """One baseline call per call; returns its stage seconds."""
    from evals.baselines import make_baseline
    from tools.imaging import load_image

    baseline = make_baseline(name)
    images = [load_image(p) for p, _, _ in normals]

    def step(i: int) -> dict[str, float]:
        _, category, anomaly_type = normals[i % len(normals)]
        return baseline(images[i % len(images)], category, anomaly_type, np.random.default_rng(i)).stages

    return step


def measure(step: Step, samples: int, memory_samples: int) -> dict[str, float | dict[str, float]]:
    """Warm-up, timed pass, then a tracemalloc pass; seconds, samples/s, mean stage seconds, peak MB."""
    started = time.perf_counter()
    step(10_000)
    warmup = time.perf_counter() - started
    stages: dict[str, list[float]] = {}
    walls = []
    for i in range(samples):
        started = time.perf_counter()
        timed = step(i)
        walls.append(time.perf_counter() - started)
        # What no stage accounts for: graph, state and file handling for the agent, glue for a baseline.
        timed["(outside stages)"] = max(0.0, walls[-1] - sum(timed.values()))
        for name, seconds in timed.items():
            stages.setdefault(name, []).append(seconds)
    tracemalloc.start()
    try:
        for i in range(memory_samples):
            step(samples + i)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {
        "samples_per_s": samples / sum(walls),
        "median_s": statistics.median(walls),
        "warmup_s": warmup,
        "stages": {k: sum(v) / samples for k, v in stages.items()},
        "traced_peak_mb": peak / 2**20,
    }


def run(samples: int, size: int, generators: list[str], memory_samples: int = 3) -> dict[str, dict]:
    """Every generator on the same normal images, in this process."""
    import torch

    from tools.imaging import save_png_atomic
    from tools.samples import sample_image

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_generators_") as tmp:
        work = Path(tmp)
        normals = []
        for i, (category, anomaly_type) in enumerate(CASES):
            path = save_png_atomic(sample_image(category, i, size=size), work / "normals" / f"{i:03d}.png")
            normals.append((path, category, anomaly_type))
        for name in generators:
            step = agent_step(normals, work) if name == "agent" else baseline_step(name, normals)
            results[name] = measure(step, samples, memory_samples)
    results["_process"] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    return results


def table(results: dict[str, dict], reference: str, title: str) -> Table:
    """A rich table: one row per generator, samples/s and its ratio to `reference`, stages, memory."""
    from rich.table import Table

    ref = results[reference]["samples_per_s"] if reference in results else float("nan")
    out = Table(title=title)
    for column in (
        "generator",
        "samples/s",
        f"x {reference}",
        "median s",
        "warm-up s",
        "traced peak MB",
        "mean s per stage",
    ):
        out.add_column(column, justify="left" if column in ("generator", "mean s per stage") else "right")
    for name, r in results.items():
        if name.startswith("_"):
            continue
        stages = ", ".join(f"{k} {v:.4f}" for k, v in sorted(r["stages"].items(), key=lambda kv: -kv[1]))
        out.add_row(
            name,
            f"{r['samples_per_s']:.2f}",
            f"{r['samples_per_s'] / ref:.3f}",
            f"{r['median_s']:.4f}",
            f"{r['warmup_s']:.2f}",
            f"{r['traced_peak_mb']:.1f}",
            stages,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from evals.eval_cli import GENERATORS

    parser = argparse.ArgumentParser(
        prog="anomaly-agent bench generators", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--samples", type=int, default=12, help="timed samples per generator")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--generators", default=",".join(GENERATORS))
    parser.add_argument("--reference", default="open_loop", help="the generator the ratios are taken against")
    args = parser.parse_args(argv)
    generators = [g.strip() for g in args.generators.split(",") if g.strip()]
    unknown = sorted(set(generators) - set(GENERATORS))
    if unknown:
        parser.error(f"unknown generators {unknown}; choose from {list(GENERATORS)}")
    results = run(args.samples, args.size, generators)
    title = f"generators, {args.size}x{args.size}, {args.samples} samples each, 1 process, 1 torch thread"
    Console(width=200).print(table(results, args.reference, title))
    print(f"peak RSS of the process: {results['_process']['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

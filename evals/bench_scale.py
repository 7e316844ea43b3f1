"""Benchmark: samples/s of a batch on the process pool and on Ray (1 and 2 workers), and Ray's cost per sample.

Run: ``anomaly-agent bench scale [--samples 24] [--size 256] [--node-ip 127.0.0.2]``.

Why in one process, on the same plan: absolute speed depends on the machine; the pool and Ray run
the same samples (same images, types and seeds) one after the other, so their difference is what Ray
adds. Ray's fixed start (the local instance, then each worker loading its toolbox) is reported apart
from the per-sample cost, since a long batch pays it once. The one-worker pool runs in this process
after a warm-up sample, so its toolbox is loaded before the clock starts, as a Ray worker's is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("LANGSMITH_TRACING", "false")

CATEGORY, TYPES = "metal_nut", ["scratch", "color"]


def _plan(images: Path, root: Path, samples: int) -> list[Any]:
    from graph.batch import list_images, plan

    found = list_images(images)
    per_image = -(-samples // (len(found) * len(TYPES)))
    return plan(found, CATEGORY, TYPES, per_image, root, seed=0)[:samples]


class Timed:
    """An executor that notes when its samples start and when the last one finishes."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.first, self.last = inner, 0.0, 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.first = time.perf_counter()
        for row in self.inner(*args, **kwargs):
            self.last = time.perf_counter()
            yield row


def run_mode(mode: str, workers: int, images: Path, work: Path, samples: int, node_ip: str | None) -> dict[str, Any]:
    """One batch of `samples` into a fresh root: wall seconds, Ray's start-up, the samples' span, per-sample run seconds."""
    from graph.batch import all_done_rows, pool_executor, run_batch
    from graph.batch_ray import RayExecutor, RaySettings

    root = work / f"{mode}{workers}"
    planned = _plan(images, root, samples)
    inner = RayExecutor(RaySettings(node_ip=node_ip, workers=workers), root) if mode == "ray" else pool_executor(workers, root / ".work")
    timed = Timed(inner)
    started = time.perf_counter()
    summary = run_batch(planned, root, overrides={}, progress=False, executor=timed)
    wall = time.perf_counter() - started
    assert summary["samples"] == samples
    startup = inner.timings["connect_s"] + inner.timings["workers_s"] if mode == "ray" else 0.0
    inside = statistics.fmean(row["seconds"] for row in all_done_rows(root))
    return {"mode": mode, "workers": workers, "wall": wall, "startup": startup,
            "run": timed.last - timed.first - startup, "inside": inside}


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from graph.batch import run_sample
    from tools.samples import make_samples

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="samples per batch")
    parser.add_argument("--size", type=int, default=256, help="side of the sample images in pixels")
    parser.add_argument("--node-ip", dest="node_ip", default="127.0.0.2", help="Ray's node address (loopback by default)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the in-process worker gets one thread, as each pool process and Ray worker has
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        make_samples(work / "images", size=args.size, per_category=4)
        images = work / "images" / CATEGORY
        run_sample(_plan(images, work / "warmup", 1)[0], {})  # load this process's toolbox before timing the pool
        rows = [run_mode(mode, workers, images, work, args.samples, args.node_ip)
                for mode, workers in (("pool", 1), ("pool", 2), ("ray", 1), ("ray", 2))]

    table = Table(title=f"batch scaling: {args.samples} samples at {args.size} px, {os.cpu_count()} CPUs")
    for column in ("mode", "workers", "samples/s (all)", "start-up s", "samples/s (after start)",
                   "s/sample in run_sample", "s/sample outside it"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in rows:
        table.add_row(row["mode"], str(row["workers"]), f"{args.samples / row['wall']:.2f}",
                      f"{row['startup']:.1f}" if row["mode"] == "ray" else "-",
                      f"{args.samples / row['run']:.2f}", f"{row['inside']:.3f}", f"{outside(row, args.samples):.3f}")
    Console().print(table)
    print("pool start-up: 1 worker runs in this process, warmed up; 2 workers start their processes inside the timed run")
    pool, ray = rows[0], rows[2]
    overhead = outside(ray, args.samples) - outside(pool, args.samples)
    print(f"ray overhead per sample (1 worker, after start-up, vs the pool in this process): {overhead * 1000:+.0f} ms "
          f"= {100 * overhead / pool['inside']:+.1f}% of a sample's {pool['inside']:.3f} s; "
          f"ray start-up {ray['startup']:.1f} s (1 worker), {rows[3]['startup']:.1f} s (2 workers)")


def outside(row: dict[str, Any], samples: int) -> float:
    """Worker-seconds per sample spent outside `run_sample` (dispatch, results, scheduling), after start-up.

    Why this and not the raw span: on a shared machine the samples' own time drifts with the load; the
    time around them is what the executor adds.
    """
    return row["run"] * row["workers"] / samples - row["inside"]


if __name__ == "__main__":
    main()

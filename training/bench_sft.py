"""Benchmark: SFT of SmolLM2-135M on the SFT data on this machine's CPU, timed, with the load around it.

    anomaly-agent bench sft --config training/configs/sft_smollm2_cpu.yaml [--wait-load 1.5 --max-wait 600]

Why the load is part of the result: the machine is shared, and a CPU run's time scales with the cores
it actually gets. The script waits (up to --max-wait seconds) for the 1-minute load average to drop
below --wait-load, samples the load every 15 s during training, and prints the wall time, steps,
seconds per step and the load seen; with --time-limit it stops early and projects the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def wait_for_load(threshold: float, max_wait: float) -> float:
    """Wait until the 1-minute load average is below `threshold` or `max_wait` seconds pass; return the load."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomaly-agent bench sft", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--output-dir", dest="output_dir")
    parser.add_argument("--dataset")
    parser.add_argument("--wait-load", type=float, default=1.5)
    parser.add_argument("--max-wait", type=float, default=0.0)
    parser.add_argument("--time-limit", type=float, help="stop training after this many seconds (then project)")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args(argv)

    from training.sft import train_sft
    from training.sft_config import SFTJobConfig

    config = SFTJobConfig.from_yaml(args.config, output_dir=args.output_dir, dataset=args.dataset, time_limit_s=args.time_limit)
    load_at_start = wait_for_load(args.wait_load, args.max_wait)
    samples: list[float] = []
    done = threading.Event()

    def sample_load() -> None:
        while not done.wait(15):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    started = time.perf_counter()
    summary = train_sft(config)
    wall = time.perf_counter() - started
    done.set()
    steps, max_steps = summary["global_steps"], summary["max_steps"]
    result = {
        **summary,
        "wall_seconds_including_load_and_save": round(wall, 1),
        "load_1min_at_start": round(load_at_start, 2),
        "load_1min_during_mean": round(sum(samples) / len(samples), 2) if samples else None,
        "load_1min_during_max": round(max(samples), 2) if samples else None,
        "cpu_count": os.cpu_count(),
        "projected_full_seconds": round(summary["train_seconds"] / max(1, steps) * max_steps, 1),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(
        f"SFT benchmark: {summary['trajectories']} trajectories ({summary['tokens']} tokens), {steps}/{max_steps} steps "
        f"in {summary['train_seconds']:.0f} s train ({wall:.0f} s wall), {summary['seconds_per_step']:.1f} s/step, "
        f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; load {result['load_1min_at_start']} at start, "
        f"mean {result['load_1min_during_mean']} during, on {os.cpu_count()} CPUs"
        + (f"; stopped by the time limit, full run projected at {result['projected_full_seconds']:.0f} s"
           if summary["stopped_by_time_limit"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

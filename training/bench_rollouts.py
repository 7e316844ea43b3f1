"""`anomaly-agent bench rollouts`: how long a round of GRPO rollouts takes per decoding mode, in one process.

Why: on a CPU the rollouts are most of a GRPO step, and an agent's turns differ in length (a 20-token
mask_gen call, a 70-token image_gen instruction). This runs the same round (the config's first
`tasks_per_step` training tasks x `num_generations`, the same run seeds) once per mode and prints its
seconds, the policy tokens generated and their rate, with each mode's speed as a ratio to the first:

* ``one``: no batching; the rollout threads take turns on the model, one reply at a time.
* ``batched``: the active rollouts' replies are decoded as one batch (`BatchScheduler`); a row leaves
  the batch as soon as it stops and its rollout goes on to its tool.

Sampling is seeded per row, so the modes should sample the same tokens; the table says whether they did
(rows can differ where float rounding of another batch shape flips a near-tie).

    anomaly-agent bench rollouts --config training/configs/grpo_smollm2_cpu.yaml --model out/sft-smollm2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

MODES = ("one", "batched")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomaly-agent bench rollouts", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a GRPO YAML (graph settings, tasks_per_step, num_generations)")
    parser.add_argument("--model", help="the policy (default: the config's)")
    parser.add_argument("--modes", default="one,batched", help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--out", default="out/bench-rollouts", help="work folder (rollout images, tasks)")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"bench rollouts: unknown mode(s) {', '.join(unknown)} (use {', '.join(MODES)})")

    import torch

    from training.grpo import load_policy, make_task_sets
    from training.grpo_config import GRPOJobConfig
    from training.grpo_rollouts import run_groups

    config = GRPOJobConfig.from_yaml(args.config, output_dir=args.out, model=args.model)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    _, local = load_policy(config)
    if local is None:
        raise SystemExit("bench rollouts needs rollout_backend local")
    train, _ = make_task_sets(config, Path(args.out) / "tasks")
    tasks = train[: config.tasks.tasks_per_step]
    rows, tokens_by_mode = [], {}
    for mode in modes:
        local.enable_batching(mode == "batched")
        local.enable_prefix_cache(config.prefix_cache)  # every mode starts from an empty cache
        started = time.perf_counter()
        groups = run_groups(tasks, config.num_generations, config.graph_overrides(), Path(args.out) / mode,
                            config.rewards, workers=config.workers, progress=True, desc=mode)
        seconds = time.perf_counter() - started
        rollouts = [r for g in groups for r in g]
        tokens_by_mode[mode] = [[t.token_ids for t in r.turns] for r in rollouts]
        generated = sum(len(t.token_ids) for r in rollouts for t in r.turns)
        rows.append((mode, seconds, len(rollouts), generated))
    local.enable_batching(False)
    from rich.console import Console
    from rich.table import Table

    first = modes[0]
    table = Table(title=f"one round: {len(tasks)} tasks x {config.num_generations} rollouts, {local.name}, "
                        f"{torch.get_num_threads()} torch threads")
    for column in ("mode", "seconds", "rollouts", "policy tokens", "tokens / s", f"speed vs {first}",
                   f"same tokens as {first}"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, seconds, count, generated in rows:
        same = sum(a == b for a, b in zip(tokens_by_mode[mode], tokens_by_mode[first]))
        table.add_row(mode, f"{seconds:.1f}", str(count), str(generated), f"{generated / seconds:.1f}",
                      f"{rows[0][1] / seconds:.2f}x", f"{same}/{count}")
    Console(width=130).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

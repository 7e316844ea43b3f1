"""`anomaly-agent bench grpo-update`: how far one GRPO update moves the policy, per update rule and learning rate.

Why: with ~10 updates in a CPU budget the update rule decides whether GRPO learns or breaks the policy
(full weights at 3e-4 broke SmolLM2's tool calls after one step; at 1e-4 they barely moved it). This
runs real rounds of rollouts once, then from the same start applies `--updates` updates per setting to
those rounds' sequences and prints, after each, the KL (k3) to the start and the surrogate gain
sum(A * delta log p) per policy token, on the same tokens. A setting that buys its gain with much more
KL is spending its budget on noise. No held-out task is used, so settings can be chosen from it fairly.

    anomaly-agent bench grpo-update --config training/configs/grpo_smollm2_cpu.yaml --model out/sft-smollm2 \\
        --settings full:1e-4,full:3e-4,lora16:1e-3,lora16:3e-3
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any


def parse_settings(text: str) -> list[tuple[str, int | None, float]]:
    """``full:1e-4,lora16:1e-3`` -> [("full", None, 1e-4), ("lora16", 16, 1e-3)]."""
    settings = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, rate = item.partition(":")
        if name == "full":
            rank = None
        elif name.startswith("lora") and name[4:].isdigit():
            rank = int(name[4:])
        else:
            raise SystemExit(f"bench grpo-update: unknown setting {item!r} (use full:LR or loraR:LR)")
        settings.append((name, rank, float(rate)))
    return settings


def measure(model: Any, sequences: list[Any], start: list[Any]) -> tuple[float, float]:
    """(KL (k3) to the start, surrogate gain sum(A * delta log p)) per policy token of `sequences`."""
    import torch

    from training.grpo_loss import k3_kl, token_logprobs

    with torch.no_grad():
        now = [token_logprobs(model, s.ids, s.positions) for s in sequences]
    tokens = sum(len(n) for n in now)
    kl = sum(float(k3_kl(a, b).sum()) for a, b in zip(now, start)) / tokens
    gain = sum(float((torch.tensor(s.advantages()) * (a - b)).sum()) for s, a, b in zip(sequences, now, start)) / tokens
    return kl, gain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomaly-agent bench grpo-update", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a GRPO YAML (graph settings, rewards, trainable_layers)")
    parser.add_argument("--model", help="the starting policy (default: the config's)")
    parser.add_argument("--settings", default="full:1e-4,lora16:1e-3", help="comma-separated full:LR or loraR:LR")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of tasks_per_step x num_generations rollouts")
    parser.add_argument("--updates", type=int, default=2, help="updates per setting, each measured")
    parser.add_argument("--out", default="out/bench-grpo-update", help="work folder (rollout images, tasks)")
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)  # before the rollouts: a typo should not cost a round

    import torch

    from training.grpo import add_lora, load_policy, make_task_sets, policy_update
    from training.grpo_config import GRPOJobConfig
    from training.grpo_loss import rollout_sequences, token_logprobs
    from training.grpo_rollouts import run_groups
    from training.sft import freeze_for_training

    config = GRPOJobConfig.from_yaml(args.config, output_dir=args.out, model=args.model)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model, _ = load_policy(config)
    train, _ = make_task_sets(config, Path(args.out) / "tasks")
    groups = []
    for index in range(args.rounds):
        tasks = [train[(index * config.tasks.tasks_per_step + j) % len(train)] for j in range(config.tasks.tasks_per_step)]
        groups += run_groups(tasks, config.num_generations, config.graph_overrides(), Path(args.out) / f"round{index}",
                             config.rewards, workers=config.workers)
    sequences, dropped = rollout_sequences(groups, config.scale_rewards, config.credit.rejected_turn_advantage)
    tokens = sum(len(s.positions) for s in sequences)
    print(f"{sum(len(g) for g in groups)} rollouts, {len(groups) - dropped} groups with spread, {tokens} policy tokens")
    if not sequences:
        print("every group had zero spread: nothing to update on (try more --rounds)")
        return 1
    base = copy.deepcopy(model).eval()
    for parameter in base.parameters():
        parameter.requires_grad = False
    with torch.no_grad():
        start = [token_logprobs(base, s.ids, s.positions) for s in sequences]
    rows = []
    for name, rank, rate in settings:
        trained = copy.deepcopy(base)
        setting = dataclasses.replace(config, lora=dataclasses.replace(config.lora, r=rank), learning_rate=rate)
        if rank:
            add_lora(trained, setting)
        else:
            freeze_for_training(trained, setting.trainable_layers, False)
        optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=rate, weight_decay=0.0)
        for update in range(1, args.updates + 1):
            started = time.perf_counter()
            policy_update(trained, base, optimizer, sequences, setting.to_trl(), apply=True)
            kl, gain = measure(trained, sequences, start)
            rows.append([name, f"{rate:g}", update, f"{kl:.4f}", f"{gain:+.4f}",
                         f"{gain / kl:.1f}" if kl > 1e-9 else "-", f"{time.perf_counter() - started:.0f}"])
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one GRPO update, from the same start, on {tokens} policy tokens of {len(groups)} groups")
    for column in ("update", "lr", "step", "KL (k3)", "gain per token", "gain / KL", "seconds"):
        table.add_column(column, justify="left" if column == "update" else "right")
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    Console(width=120).print(table)
    return 0

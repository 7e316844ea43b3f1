"""The training subcommands of `anomaly-agent` (``trajectories export``, ``trajectories reverse``, ``train sft``, ``train grpo``).

`graph/cli.py` only declares their flags and imports this module when one of them runs, so the
other commands never pay for datasets, TRL or matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_trajectories_export(args: argparse.Namespace) -> int:
    from training.trajectories import TrajectoryError, export_records

    statuses = None if args.all_statuses else tuple(s for s in args.statuses.split(",") if s)
    if bool(args.input) == bool(args.langgraph_url):
        raise TrajectoryError("give either --input or --langgraph-url")
    records = None
    if args.langgraph_url:
        from training.served_runs import parse_since, records_from_langgraph

        out = Path(args.out)
        records = records_from_langgraph(args.langgraph_url, assistant=args.assistant,
                                         since=parse_since(args.since) if args.since else None,
                                         image_dir=out.with_name(f"{out.stem}_images"))
    summary = export_records(
        args.input or [args.langgraph_url],
        Path(args.out),
        hf_dataset=Path(args.hf_dataset) if args.hf_dataset else None,
        with_images=args.images,
        statuses=statuses,
        records_in=records,
    )
    print(json.dumps(summary))
    return 0


def cmd_trajectories_reverse(args: argparse.Namespace) -> int:
    from training.reverse import reverse_synthesize

    stages = tuple(int(s) for s in args.stages.split(",") if s.strip())
    overrides = {"config_file": args.config} if args.config else {}
    summary = reverse_synthesize(
        Path(args.dataset),
        Path(args.out),
        seed=args.seed,
        stages=stages,
        categories=[c for c in (args.categories or "").split(",") if c] or None,
        limit=args.limit,
        size=args.size,
        overrides=overrides,
        progress=sys.stderr.isatty(),
    )
    print(json.dumps(summary))
    return 0


def cmd_train_sft(args: argparse.Namespace) -> int:
    from training.sft import train_sft
    from training.sft_config import SFTJobConfig

    config = SFTJobConfig.from_yaml(args.config, dataset=args.dataset, output_dir=args.output_dir, model=args.model,
                                    max_steps=args.max_steps, time_limit_s=args.time_limit)
    summary = train_sft(config, progress=sys.stderr.isatty())
    print(json.dumps(summary))
    print(
        f"sft {summary['trajectories']} trajectories, {summary['global_steps']} steps, "
        f"{summary['train_seconds']:.0f} s, loss {summary['first_loss'] or float('nan'):.3f} -> "
        f"{summary['final_loss'] or float('nan'):.3f}; "
        f"checkpoint {summary['checkpoint']}",
        file=sys.stderr,
    )
    return 0


def cmd_train_grpo(args: argparse.Namespace) -> int:
    from training.grpo import train_grpo
    from training.grpo_config import GRPOJobConfig

    config = GRPOJobConfig.from_yaml(args.config, output_dir=args.output_dir, model=args.model, max_steps=args.max_steps)
    summary = train_grpo(config, resume=args.resume, progress=sys.stderr.isatty())
    for row in summary["history"]:
        print(f"step {row['step']} reward {row['reward_mean']:.3f} +- {row['reward_std']:.3f} "
              f"(task {row['task']:.3f} reflection {row['reflection']:.3f} behaviour {row['behaviour']:.3f}) "
              f"loss {row['loss']:.4f} kl {row['kl']:.4f} clip {row['clip_fraction']:.3f} "
              f"dropped {row['groups_dropped']} repeats {row.get('repeated_calls', 0)} "
              f"top-thought {row.get('top_thought_share', 0.0):.2f} {row['seconds']:.0f}s")
    print(f"curve {summary['curve']}; final model {summary['final_model']}; {summary['wall_seconds']:.0f} s")
    if summary["before"] is None or summary["after"] is None:
        print(f"grpo steps {summary['steps']} (no held-out evaluation)")
        return 0
    print_heldout(summary)
    return 0


def cmd_eval_grpo(args: argparse.Namespace) -> int:
    from training.grpo import compare_policies
    from training.grpo_config import GRPOJobConfig

    config = GRPOJobConfig.from_yaml(args.config, output_dir=args.output_dir, heldout_seed=args.heldout_seed,
                                     heldout_tasks=args.heldout_tasks, workers=args.workers)
    summary = compare_policies(config, args.before, args.after, progress=sys.stderr.isatty())
    print(f"held-out seed {summary['heldout_seed']}: {', '.join(summary['heldout_tasks'])}")
    for entry in summary["afters"]:  # the last line is the last after-policy's
        if len(summary["afters"]) > 1:
            print(f"{entry['label']}: {entry['model']}")
        print_heldout({"before": summary["before"], "after": entry["result"], "paired": entry["paired"]})
    return 0


def print_heldout(summary: dict) -> None:
    """The held-out before/after lines; the last reads ``grpo reward_before <a> reward_after <b>``."""
    before, after = summary["before"], summary["after"]
    for label, part in (("before", before), ("after", after)):
        print(f"held-out {label}: reward {part['reward_mean']:.3f} std {part['reward_std']:.3f} "
              f"within-group std {part['group_std_mean']:.3f} over {part['rollouts']} rollouts; "
              f"score {part['score']:.2f} protocol {part['protocol']:.3f} masked_runs {part['masked_runs']:.3f} "
              f"repeated_calls {part.get('repeated_calls', 0)} top_thought {part.get('top_thought_share', 0.0):.2f}")
    if summary.get("paired"):
        paired = summary["paired"]
        print(f"held-out paired difference (after - before, same tasks and seeds): {paired['mean']:+.3f} "
              f"(standard error {paired['se']:.3f} over {paired['pairs']} pairs)")
    print(f"grpo reward_before {before['reward_mean']:.4f} reward_after {after['reward_mean']:.4f}")

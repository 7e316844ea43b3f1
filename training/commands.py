"""The training subcommands of `anomaly-agent` (``trajectories export``, ``trajectories reverse``, ``train sft``).

`graph/cli.py` only declares their flags and imports this module when one of them runs, so the
other commands never pay for datasets, TRL or matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_trajectories_export(args: argparse.Namespace) -> int:
    from training.trajectories import export_records

    statuses = None if args.all_statuses else tuple(s for s in args.statuses.split(",") if s)
    summary = export_records(
        args.input,
        Path(args.out),
        hf_dataset=Path(args.hf_dataset) if args.hf_dataset else None,
        with_images=args.images,
        statuses=statuses,
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

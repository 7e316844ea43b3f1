"""The options and the command of `anomaly-agent eval transfer`, without importing torch at parse time.

The detector, its budget and the splits have defaults in `evals.transfer_config`; the flags exist to
make a smaller run (tests, a quick look), never to tune a setting per generator.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from evals.transfer_config import ROWS, DetectorConfig, SplitConfig, TransferConfig


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def config_from_args(args: Any) -> TransferConfig:
    """The command line as a `TransferConfig` (unset flags keep the defaults)."""
    split, det = SplitConfig(), DetectorConfig()
    types = _csv(args.types)
    categories = tuple(_csv(args.categories) or split.categories)
    split = replace(
        split,
        categories=categories,
        types={c: tuple(types) for c in categories} if types else None,
        **{k: getattr(args, k) for k in ("size", "train_normals", "test_normals", "test_anomalies") if getattr(args, k) is not None},
    )
    det = replace(det, **{k: getattr(args, k) for k in ("steps", "unet_base") if getattr(args, k) is not None})
    return TransferConfig(
        out=Path(args.out),
        generators=tuple(_csv(args.generators) or ROWS),
        detector_seeds=args.detector_seeds,
        data_draws=args.data_draws,
        seed=args.seed,
        split=split,
        detector=det,
        progress=not args.no_progress,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `anomaly-agent eval transfer`."""
    split, det = SplitConfig(), DetectorConfig()
    parser.add_argument("--out", required=True,
                        help="folder for report.md, report.json, bars.png, contact sheets and each draw's draw_<seed>/data/")
    parser.add_argument("--generators", help=f"comma-separated subset of {','.join(ROWS)} (default: all)")
    parser.add_argument("--categories", help=f"comma-separated sample categories (default: {','.join(split.categories)})")
    parser.add_argument("--types", help="comma-separated defect types for every category (default: all of each category)")
    seeds = TransferConfig.detector_seeds
    parser.add_argument("--detector-seeds", dest="detector_seeds", type=int, default=seeds, help=f"detector seeds (default {seeds})")
    draws = TransferConfig.data_draws
    parser.add_argument("--data-draws", dest="data_draws", type=int, default=draws,
                        help=f"data draws: the whole data set drawn anew with seeds SEED, SEED+1, ... (default {draws})")
    parser.add_argument("--seed", type=int, default=0, help="first data seed (normals, generators)")
    parser.add_argument("--size", type=int, help=f"image side (default {split.size})")
    parser.add_argument("--train-normals", dest="train_normals", type=int,
                        help=f"training normals per category (default {split.train_normals})")
    parser.add_argument("--test-normals", dest="test_normals", type=int,
                        help=f"held-out normals per category (default {split.test_normals})")
    parser.add_argument("--test-anomalies", dest="test_anomalies", type=int,
                        help=f"anomalies per test source and category (default {split.test_anomalies})")
    parser.add_argument("--steps", type=int, help=f"detector training steps (default {det.steps})")
    parser.add_argument("--unet-base", dest="unet_base", type=int, help=f"detector width (default {det.unet_base})")
    parser.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the markdown report; the last line is the summary line."""
    from evals.transfer import last_line, run_transfer
    from evals.transfer_report import markdown

    report = run_transfer(config_from_args(args))
    print(markdown(report))
    print(f"wrote {args.out}/report.md, report.json, bars.png, contact_*.png", file=sys.stderr)
    print(last_line(report))
    return 0

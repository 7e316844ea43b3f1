"""The evaluation commands of `anomaly-agent` (``eval policy``, ``eval generators``, the ``bench`` benchmarks).

Each command imports its evaluation only when it runs, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graph.cli import add_passthrough, command_group, run_options, run_overrides

if TYPE_CHECKING:
    from evals.generator_eval import EvalConfig


def user_errors() -> tuple[type[BaseException], ...]:
    """The evaluations' exceptions whose message is written for the user."""
    from evals.errors import EvalError

    return (EvalError,)


def cmd_eval_policy(args: argparse.Namespace) -> int:
    from rich.console import Console

    from evals.policy_eval import evaluate_policy, format_table, last_line

    overrides = run_overrides(args)
    started = time.perf_counter()
    summary = evaluate_policy(overrides, args.tasks, seed=args.seed, size=args.size, progress=sys.stderr.isatty())
    label = overrides.get("policy", "scripted") + (f" {overrides['model']}" if overrides.get("model") else "")
    Console().print(format_table(summary, f"policy eval: {label}, {args.tasks} tasks, {time.perf_counter() - started:.0f}s"))
    print(last_line(summary))
    return 0


def cmd_eval_generators(args: argparse.Namespace) -> int:
    from evals.eval_report import markdown
    from evals.generator_eval import last_line, run_eval

    report = run_eval(config_from_args(args))
    print(markdown(report))
    print(f"wrote {args.out}/report.md, report.json, bars.png, matrix_*.png, contact_*.png", file=sys.stderr)
    print(last_line(report))
    return 0


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def config_from_args(args: Any) -> EvalConfig:
    """The `eval generators` command line as an `EvalConfig` (the CLI only wires arguments)."""
    from evals.eval_cli import GENERATORS
    from evals.generator_eval import EvalConfig
    from evals.protocols import TrainConfig

    return EvalConfig(
        out=Path(args.out),
        generators=_csv(args.generators) or list(GENERATORS),
        categories=_csv(args.categories) or ([] if args.real else ["tile", "metal_nut"]),
        types=_csv(args.types),
        size=args.size,
        train_normals=args.train_normals,
        test_normals=args.test_normals,
        real=Path(args.real) if args.real else None,
        seed=args.seed,
        train=TrainConfig(
            cls_epochs=args.cls_epochs,
            loc_epochs=args.loc_epochs,
            unet_base=args.unet_base,
            resnet_weights=args.resnet_weights,
            seed=args.seed,
        ),
        inception_weights=args.inception_weights,
        lpips_weights=args.lpips_weights,
        progress=not args.no_progress,
    )


#: The ``bench`` subcommands: (name, module of this package whose ``main(argv)`` runs it, help).
BENCHMARKS: tuple[tuple[str, str, str], ...] = (
    ("qe", "bench_qe", "the judge's AUROC on synthetic defects of known quality"),
    ("agent", "bench_agent", "time and memory per sample of the agent and of each tool"),
    ("loop", "loop_study", "closed loop vs open loop on degraded first instructions"),
    ("generators", "bench_generators", "agent vs baselines: samples/s, stages, memory"),
    ("contact-sheets", "contact_sheets", "contact sheets of the embedded image engine per family and category"),
    ("gpu-backends", "gpu_bench_backends", "the production image backends' time and GPU memory per sample"),
    ("diversity", "bench_diversity", "per defect type: spread of mask area, contrast and outline irregularity"),
    ("camera", "bench_camera", "per family: noise and JPEG-blockiness ratio inside a defect vs a ring around it"),
    ("scale", "bench_scale", "samples/s of the process pool and of Ray (1 and 2 workers), Ray's cost per sample"),
)


def _main_of(module: str) -> Callable[[list[str]], int | None]:
    """The ``main(argv)`` of `module` in this package, imported when the command runs."""
    return lambda argv: import_module(f"{__package__}.{module}").main(argv)


def register(sub: Any) -> None:
    """Add the evaluation commands to the `anomaly-agent` subcommands `sub`."""
    from evals import transfer_cli
    from evals.eval_cli import add_arguments as add_eval_generator_arguments

    ev = command_group(sub, "eval", "evaluations")
    q = ev.add_parser("policy", help="how well a policy drives the agent: call validity, protocol, masks, score")
    q.add_argument("--tasks", type=int, default=20, help="number of tasks (sample image x defect type)")
    q.add_argument("--size", type=int, default=128, help="side of the sample images in pixels")
    run_options(q)
    q.set_defaults(func=cmd_eval_policy)
    q = ev.add_parser("generators", help="agent vs baselines: downstream localization/classification, IS/IC-LPIPS, samples/s")
    add_eval_generator_arguments(q)
    q.set_defaults(func=cmd_eval_generators)
    q = ev.add_parser("transfer", help="train a small detector on each generator, test it on anomalies it never made")
    transfer_cli.add_arguments(q)
    q.set_defaults(func=transfer_cli.run)

    bench = command_group(sub, "bench", "benchmarks (each takes its own options; see its --help)")
    for name, module, help in BENCHMARKS:
        add_passthrough(bench, name, help, _main_of(module))

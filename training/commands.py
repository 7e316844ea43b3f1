"""The training commands of `anomaly-agent` (``trajectories``, ``train``, ``eval grpo``, the training benchmarks).

Each command imports its training code only when it runs, so the other commands never pay for
datasets, TRL or matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

from graph.cli import add_passthrough, command_group


def user_errors() -> tuple[type[BaseException], ...]:
    """The training exceptions whose message is written for the user."""
    from training.grpo_config import GRPOConfigError
    from training.reverse import ReverseError
    from training.sft_config import SFTConfigError
    from training.trajectories import TrajectoryError

    return (ReverseError, SFTConfigError, GRPOConfigError, TrajectoryError)


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


#: The ``bench`` subcommands: (name, module of this package whose ``main(argv)`` runs it, help).
BENCHMARKS: tuple[tuple[str, str, str], ...] = (
    ("grpo-update", "bench_grpo_update", "KL vs gain of one GRPO update per rule and learning rate"),
    ("rollouts", "bench_rollouts", "a GRPO round's time per decoding mode"),
    ("sft", "bench_sft", "SFT training time and memory, waiting for a quiet machine"),
)


def _main_of(module: str) -> Callable[[list[str]], int | None]:
    """The ``main(argv)`` of `module` in this package, imported when the command runs."""
    return lambda argv: import_module(f"{__package__}.{module}").main(argv)


def register(sub: Any) -> None:
    """Add the training commands to the `anomaly-agent` subcommands `sub`."""
    ev = command_group(sub, "eval", "evaluations")
    q = ev.add_parser("grpo", help="held-out GRPO reward of a policy before and one or more after training, "
                                   "on the same tasks and seeds, paired")
    q.add_argument("--config", required=True, help="the GRPO YAML (graph settings, rewards, held-out size)")
    q.add_argument("--before", required=True, help="model folder before training (e.g. the SFT checkpoint)")
    q.add_argument("--after", required=True, nargs="+",
                   help="model folder(s) after training (e.g. OUTPUT_DIR/final); several share one 'before' run")
    q.add_argument("--heldout-seed", dest="heldout_seed", type=int, help="another held-out set than the config's")
    q.add_argument("--heldout-tasks", dest="heldout_tasks", type=int, help="override the config's heldout_tasks")
    q.add_argument("--workers", type=int, help="rollouts at once (local backend: rows of one decoding batch)")
    q.add_argument("--output-dir", dest="output_dir", help="where rollouts and grpo_compare.json go")
    q.set_defaults(func=cmd_eval_grpo)

    tr = command_group(sub, "trajectories", "training data: export graph traces, reverse-synthesize real anomalies")
    q = tr.add_parser("export", help="graph traces -> trajectory JSONL (and a Hugging Face dataset for SFT)")
    q.add_argument("--input", nargs="+",
                   help="batch roots, run folders, trajectory .json/.jsonl files or SqliteSaver .sqlite files")
    q.add_argument("--langgraph-url", dest="langgraph_url",
                   help="instead of --input: the threads of a LangGraph server (langgraph dev, Platform), via its SDK")
    q.add_argument("--assistant", default="anomaly_agent", help="with --langgraph-url: graph or assistant id")
    q.add_argument("--since", help="with --langgraph-url: threads updated on or after this ISO date/time (UTC)")
    q.add_argument("--out", required=True, help="JSONL file to write")
    q.add_argument("--hf-dataset", dest="hf_dataset", help="also save a datasets.Dataset (messages, tools) here")
    q.add_argument("--images", action="store_true", help="add the normal image (for vision-language policies)")
    q.add_argument("--statuses", default="success,budget_exhausted", help="keep runs with these statuses")
    q.add_argument("--all-statuses", dest="all_statuses", action="store_true", help="keep every run")
    q.set_defaults(func=cmd_trajectories_export)
    q = tr.add_parser("reverse", help="staged 1-3 image_gen trajectories ending in real anomalies (MVTec layout)")
    q.add_argument("--dataset", required=True, help="ROOT with ROOT/<category>/test/<type> and ground_truth/<type>")
    q.add_argument("--out", required=True, help="JSONL file to write; images go to <out>_runs/")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--stages", default="1,2,3", help="image_gen calls per trajectory, comma-separated")
    q.add_argument("--categories", help="comma-separated subset of categories")
    q.add_argument("--limit", type=int, help="use at most this many anomalies")
    q.add_argument("--size", type=int, help="resize images so the longer side is this many pixels")
    q.add_argument("--config", help="YAML file with agent configuration keys (budget, QE thresholds...)")
    q.set_defaults(func=cmd_trajectories_reverse)
    add_passthrough(tr, "sft-data", "the SFT data set: scripted graph runs plus reverse trajectories, held-out split",
                    _main_of("data"))

    tr = command_group(sub, "train", "train a policy")
    q = tr.add_parser("sft", help="supervised fine-tuning on trajectories with TRL (assistant-only loss)")
    q.add_argument("--config", required=True, help="YAML file of training.sft_config.SFTJobConfig fields")
    q.add_argument("--dataset", help="override the config's dataset")
    q.add_argument("--output-dir", dest="output_dir", help="override the config's output_dir")
    q.add_argument("--model", help="override the config's base model folder")
    q.add_argument("--max-steps", dest="max_steps", type=int, help="override the config's max_steps")
    q.add_argument("--time-limit", dest="time_limit", type=float, help="stop training after this many seconds")
    q.set_defaults(func=cmd_train_sft)
    q = tr.add_parser("grpo", help="GRPO from groups of the policy's own rollouts through the graph")
    q.add_argument("--config", required=True, help="YAML file of training.grpo_config.GRPOJobConfig fields")
    q.add_argument("--output-dir", dest="output_dir", help="override the config's output_dir")
    q.add_argument("--model", help="override the config's starting model folder")
    q.add_argument("--max-steps", dest="max_steps", type=int, help="override the config's max_steps")
    q.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint (optimizer and step)")
    q.set_defaults(func=cmd_train_grpo)

    bench = command_group(sub, "bench", "benchmarks (each takes its own options; see its --help)")
    for name, module, help in BENCHMARKS:
        add_passthrough(bench, name, help, _main_of(module))

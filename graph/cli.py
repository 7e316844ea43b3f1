"""The `anomaly-agent` command line.

Why errors are caught here and nowhere deeper: library code raises exceptions with messages written
for the user; the CLI is the edge where a known error becomes one line on stderr and exit code 2,
and only an unexpected bug shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")



def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is written for the user: shown as one line, no traceback."""
    from evals.errors import EvalError
    from graph.batch import BatchError
    from graph.configuration import ConfigurationError
    from graph.policies.base import PolicyError
    from tools.imaging import ImageInputError
    from tools.knowledge.catalog import KnowledgeBaseError, UnknownAnomalyTypeError, UnknownCategoryError
    from training.reverse import ReverseError
    from training.grpo_config import GRPOConfigError
    from training.sft_config import SFTConfigError
    from training.trajectories import TrajectoryError

    return (
        EvalError,
        ReverseError,
        SFTConfigError,
        GRPOConfigError,
        TrajectoryError,
        BatchError,
        ConfigurationError,
        PolicyError,
        ImageInputError,
        KnowledgeBaseError,
        UnknownAnomalyTypeError,
        UnknownCategoryError,
        FileNotFoundError,
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Configuration overrides from the flags every run command shares."""
    values = {"seed": getattr(args, "seed", None), "config_file": getattr(args, "config", None)}
    for key in ("policy", "base_url", "model", "temperature", "max_tokens"):
        values[key] = getattr(args, key, None)
    return {k: v for k, v in values.items() if v is not None}


def _check_inputs(category: str, anomaly_types: list[str]) -> tuple[str, list[str]]:
    """Normalised category and types, or a clear error naming the close matches."""
    from tools.knowledge.catalog import load_catalog

    catalog = load_catalog()
    name = catalog.category(category).name
    return name, [catalog.defect(name, t).name for t in anomaly_types]


def cmd_synthesize(args: argparse.Namespace) -> int:
    from graph.configuration import Configuration
    from graph.graph import build_graph, recursion_limit
    from graph.nodes import INFRASTRUCTURE_STATUSES
    from tools.imaging import load_image

    category, (anomaly_type,) = _check_inputs(args.category, [args.anomaly_type])
    load_image(args.image)  # fail fast with the loader's one-line message
    overrides = _overrides(args)
    cfg = Configuration.load(overrides=overrides)
    _check_policy(cfg)
    out = Path(args.out)
    started = time.perf_counter()
    values = build_graph().invoke(
        {"image": str(Path(args.image).resolve()), "category": category, "anomaly_type": anomaly_type, "seed": cfg.seed, "run_dir": str(out)},
        {"configurable": overrides, "recursion_limit": recursion_limit(cfg)},
    )
    result = values.get("result", {})
    print(
        json.dumps(
            {
                "status": values.get("status"),
                "score": result.get("score"),
                "steps": result.get("steps"),
                "seconds": round(time.perf_counter() - started, 3),
                "anomaly": result.get("anomaly_path"),
                "mask": result.get("mask_path"),
                "trajectory": result.get("trajectory_path"),
                **({"error": result["error"]} if result.get("error") else {}),
            }
        )
    )
    if values.get("status") in INFRASTRUCTURE_STATUSES:
        print(f"anomaly-agent: error: {result.get('error', 'the policy or a tool backend failed')}", file=sys.stderr)
        return 1
    return 0


def _check_policy(cfg: Any) -> None:
    """Set the policy up and check the tool backends before any run, so a missing endpoint, model
    folder or checkpoint fails once, up front."""
    from graph.policies import check_policy
    from graph.toolbox import check_toolbox

    check_toolbox(cfg)
    check_policy(cfg)


def cmd_batch(args: argparse.Namespace) -> int:
    from graph.batch import list_images, plan, run_batch

    category, types = _check_inputs(args.category, [t for t in args.anomaly_types.split(",") if t.strip()])
    root = Path(args.out).resolve()
    from graph.configuration import Configuration

    _check_policy(Configuration.load(overrides=_overrides(args)))
    samples = plan(list_images(Path(args.input)), category, types, args.per_image, root, args.seed)
    summary = run_batch(samples, root, overrides=_overrides(args), workers=args.workers, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("samples", "statuses", "mask_iou_mean", "score_mean", "seconds_per_sample_median")}))
    print(f"wrote {root}/{category}/test, ground_truth, trajectories.jsonl, summary.json, contact_sheet.png", file=sys.stderr)
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from tools.samples import make_samples

    written = make_samples(Path(args.out), size=args.size)
    for item in written:
        print(f"{item['category']}\t{item['kind']}\t{item['path']}")
    return 0


def cmd_kb_list(args: argparse.Namespace) -> int:
    from tools.knowledge.catalog import load_catalog

    catalog = load_catalog()
    for category in catalog.categories(args.dataset):
        types = ", ".join(d.name for d in category.defects.values())
        print(f"{category.dataset}\t{category.name}\t{category.kind}\t{types}")
    return 0


def cmd_serve_policy(args: argparse.Namespace) -> int:
    from graph.serve_policy import serve

    serve(args.model, host=args.host, port=args.port, served_name=args.served_model_name, max_tokens=args.max_tokens)
    return 0


def cmd_eval_policy(args: argparse.Namespace) -> int:
    from rich.console import Console

    from evals.policy_eval import evaluate_policy, format_table, last_line

    overrides = _overrides(args)
    started = time.perf_counter()
    summary = evaluate_policy(overrides, args.tasks, seed=args.seed, size=args.size, progress=sys.stderr.isatty())
    label = overrides.get("policy", "scripted") + (f" {overrides['model']}" if overrides.get("model") else "")
    Console().print(format_table(summary, f"policy eval: {label}, {args.tasks} tasks, {time.perf_counter() - started:.0f}s"))
    print(last_line(summary))
    return 0


def cmd_eval_generators(args: argparse.Namespace) -> int:
    from evals.eval_cli import config_from_args
    from evals.eval_report import markdown
    from evals.generator_eval import last_line, run_eval

    report = run_eval(config_from_args(args))
    print(markdown(report))
    print(f"wrote {args.out}/report.md, report.json, bars.png, matrix_*.png, contact_*.png", file=sys.stderr)
    print(last_line(report))
    return 0


def _training(name: str) -> Callable[[argparse.Namespace], int]:
    """A training subcommand, imported from `training.commands` only when it runs."""

    def run(args: argparse.Namespace) -> int:
        from training import commands

        return getattr(commands, name)(args)

    return run


#: Benchmark name -> module whose `main(argv)` runs it (evals/ is imported only when asked for).
BENCHMARKS = {"qe": "evals.bench_qe", "agent": "evals.bench_agent", "loop": "evals.loop_study",
              "generators": "evals.bench_generators", "grpo-update": "evals.bench_grpo_update",
              "rollouts": "evals.bench_rollouts", "diversity": "evals.bench_diversity", "camera": "evals.bench_camera"}


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(BENCHMARKS[args.name]).main(args.args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly-agent", description="Synthesize realistic industrial defects with pixel masks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of each step")
    sub = parser.add_subparsers(dest="command", required=True)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--config", help="YAML file with configuration keys (see README)")
        p.add_argument("--policy", choices=["scripted", "openai", "local"])
        p.add_argument("--base-url", dest="base_url")
        p.add_argument("--model", help="model name (openai) or local model folder (local; default SmolLM2-135M-Instruct)")
        p.add_argument("--temperature", type=float, help="policy sampling temperature (default 0: greedy)")
        p.add_argument("--max-tokens", dest="max_tokens", type=int, help="most tokens per policy turn")

    p = sub.add_parser("synthesize", help="one defect on one image")
    p.add_argument("--image", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--anomaly-type", required=True)
    p.add_argument("--out", required=True)
    run_options(p)
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("batch", help="many defects over a folder, written in the MVTec-AD layout")
    p.add_argument("--input", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--anomaly-types", required=True, help="comma-separated")
    p.add_argument("--per-image", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="finish an interrupted batch in the same --out")
    run_options(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("samples", help="write normal sample images built from scikit-image's bundled data")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256)
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("serve-policy", help="serve a local model as an OpenAI-compatible chat endpoint")
    p.add_argument("--model", help="local Hugging Face model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model id the server reports (default: the folder's name)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=512, help="default max_tokens per request")
    p.set_defaults(func=cmd_serve_policy)

    p = sub.add_parser("eval", help="evaluations")
    ev = p.add_subparsers(dest="eval_command", required=True)
    q = ev.add_parser("policy", help="how well a policy drives the agent: call validity, protocol, masks, score")
    q.add_argument("--tasks", type=int, default=20, help="number of tasks (sample image x defect type)")
    q.add_argument("--size", type=int, default=128, help="side of the sample images in pixels")
    run_options(q)
    q.set_defaults(func=cmd_eval_policy)
    q = ev.add_parser("generators", help="agent vs baselines: downstream localization/classification, IS/IC-LPIPS, samples/s")
    from evals.eval_cli import add_arguments as add_eval_generator_arguments

    add_eval_generator_arguments(q)
    q.set_defaults(func=cmd_eval_generators)
    q = ev.add_parser("transfer", help="train a small detector on each generator, test it on anomalies it never made")
    from evals import transfer_cli

    transfer_cli.add_arguments(q)
    q.set_defaults(func=transfer_cli.run)

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
    q.set_defaults(func=_training("cmd_eval_grpo"))

    p = sub.add_parser("trajectories", help="training data: export graph traces, reverse-synthesize real anomalies")
    tr = p.add_subparsers(dest="trajectories_command", required=True)
    q = tr.add_parser("export", help="graph traces -> trajectory JSONL (and a Hugging Face dataset for SFT)")
    q.add_argument("--input", required=True, nargs="+",
                   help="batch roots, run folders, trajectory .json/.jsonl files or SqliteSaver .sqlite files")
    q.add_argument("--out", required=True, help="JSONL file to write")
    q.add_argument("--hf-dataset", dest="hf_dataset", help="also save a datasets.Dataset (messages, tools) here")
    q.add_argument("--images", action="store_true", help="add the normal image (for vision-language policies)")
    q.add_argument("--statuses", default="success,budget_exhausted", help="keep runs with these statuses")
    q.add_argument("--all-statuses", dest="all_statuses", action="store_true", help="keep every run")
    q.set_defaults(func=_training("cmd_trajectories_export"))
    q = tr.add_parser("reverse", help="staged 1-3 image_gen trajectories ending in real anomalies (MVTec layout)")
    q.add_argument("--dataset", required=True, help="ROOT with ROOT/<category>/test/<type> and ground_truth/<type>")
    q.add_argument("--out", required=True, help="JSONL file to write; images go to <out>_runs/")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--stages", default="1,2,3", help="image_gen calls per trajectory, comma-separated")
    q.add_argument("--categories", help="comma-separated subset of categories")
    q.add_argument("--limit", type=int, help="use at most this many anomalies")
    q.add_argument("--size", type=int, help="resize images so the longer side is this many pixels")
    q.add_argument("--config", help="YAML file with agent configuration keys (budget, QE thresholds...)")
    q.set_defaults(func=_training("cmd_trajectories_reverse"))

    p = sub.add_parser("train", help="train a policy")
    tr = p.add_subparsers(dest="train_command", required=True)
    q = tr.add_parser("sft", help="supervised fine-tuning on trajectories with TRL (assistant-only loss)")
    q.add_argument("--config", required=True, help="YAML file of training.sft_config.SFTJobConfig fields")
    q.add_argument("--dataset", help="override the config's dataset")
    q.add_argument("--output-dir", dest="output_dir", help="override the config's output_dir")
    q.add_argument("--model", help="override the config's base model folder")
    q.add_argument("--max-steps", dest="max_steps", type=int, help="override the config's max_steps")
    q.add_argument("--time-limit", dest="time_limit", type=float, help="stop training after this many seconds")
    q.set_defaults(func=_training("cmd_train_sft"))
    q = tr.add_parser("grpo", help="GRPO from groups of the policy's own rollouts through the graph")
    q.add_argument("--config", required=True, help="YAML file of training.grpo_config.GRPOJobConfig fields")
    q.add_argument("--output-dir", dest="output_dir", help="override the config's output_dir")
    q.add_argument("--model", help="override the config's starting model folder")
    q.add_argument("--max-steps", dest="max_steps", type=int, help="override the config's max_steps")
    q.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint (optimizer and step)")
    q.set_defaults(func=_training("cmd_train_grpo"))

    p = sub.add_parser("bench", help="benchmarks: qe (judge AUROC), agent (time and memory), loop (closed vs open loop), generators (agent vs baselines: samples/s, stages, memory), grpo-update (KL vs gain of one GRPO update per rule and learning rate), rollouts (a GRPO round's time per decoding mode)")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark (see its --help)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("kb", help="the knowledge base")
    kb = p.add_subparsers(dest="kb_command", required=True)
    q = kb.add_parser("list", help="categories and their defect types")
    q.add_argument("--dataset", choices=["mvtec_ad", "visa"])
    q.set_defaults(func=cmd_kb_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"anomaly-agent: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anomaly-agent: interrupted; rerun a batch with --resume to finish it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

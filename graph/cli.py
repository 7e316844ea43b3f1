"""The graph's commands of `anomaly-agent` (synthesize, batch, samples, serve-policy, kb) and the helpers
every package's command group shares (run options, command groups, pass-through benchmarks).

The command line itself is `anomaly_agent_cli`; each package adds its commands with `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


class OutputPathError(ValueError):
    """An --out path that cannot hold the outputs: it names the path and the reason."""


def check_out_folder(path: str | Path) -> Path:
    """The --out folder, checked before any work: a folder (or creatable under a folder) where a file
    can be written. Creates nothing.

    Why a probe write rather than permission bits: root ignores the bits, a read-only mount does not.

    Raises:
        OutputPathError: the path is a file, lies under a file, or its nearest existing folder refuses a write.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out}: is a file, not a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"--out {out}: {existing} is a file, so no folder can be made under it")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".anomaly-agent-probe-"):
            pass
    except OSError as error:
        raise OutputPathError(f"--out {out}: cannot write in {existing} ({error.strerror or error})") from None
    return out


def _count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high], refused in one line otherwise."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return count


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is written for the user: shown as one line, no traceback."""
    from graph.batch import BatchError
    from graph.batch_guard import RootBusyError
    from graph.configuration import ConfigurationError
    from graph.policies.base import PolicyError
    from graph.run_inputs import RunInputError
    from tools.imaging import ImageInputError
    from tools.knowledge.catalog import KnowledgeBaseError, UnknownAnomalyTypeError, UnknownCategoryError

    return (
        OutputPathError,
        BatchError,
        RootBusyError,
        ConfigurationError,
        PolicyError,
        ImageInputError,
        RunInputError,
        KnowledgeBaseError,
        UnknownAnomalyTypeError,
        UnknownCategoryError,
        FileNotFoundError,
    )


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
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

    out = check_out_folder(args.out)
    category, (anomaly_type,) = _check_inputs(args.category, [args.anomaly_type])
    load_image(args.image)  # fail fast with the loader's one-line message
    overrides = run_overrides(args)
    cfg = Configuration.load(overrides=overrides)
    _check_policy(cfg)
    started = time.perf_counter()
    values = build_graph().invoke(
        {"image": str(Path(args.image).resolve()), "category": category, "anomaly_type": anomaly_type, "seed": cfg.seed, "run_dir": str(out)},
        {"configurable": overrides, "recursion_limit": recursion_limit(cfg)},
        context=cfg,
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

    root = check_out_folder(args.out).resolve()
    category, types = _check_inputs(args.category, [t for t in args.anomaly_types.split(",") if t.strip()])
    from graph.configuration import Configuration

    _check_policy(Configuration.load(overrides=run_overrides(args)))
    samples = plan(list_images(Path(args.input)), category, types, args.per_image, root, args.seed)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # a warning (an input error) gets its own line, not the progress bar's
        summary = run_batch(samples, root, overrides=run_overrides(args), workers=args.workers or 1,
                            resume=args.resume, executor=_ray_executor(args, root))
    print(json.dumps({k: summary[k] for k in ("samples", "statuses", "mask_iou_mean", "score_mean", "seconds_per_sample_median")}))
    errors = len(summary["input_errors"])
    print(f"wrote {root}/{category}/test, ground_truth, trajectories.jsonl, summary.json, contact_sheet.png; "
          f"{errors} input error{'' if errors == 1 else 's'}" + (" (listed in summary.json input_errors)" if errors else ""), file=sys.stderr)
    return 0


def _ray_executor(args: argparse.Namespace, root: Path) -> Any:
    """The Ray executor `batch --ray` asks for, or None for the process pool."""
    if args.ray is None:
        return None
    from graph.batch_ray import RayExecutor, RaySettings

    settings = RaySettings(address=None if args.ray == "local" else args.ray, node_ip=args.ray_node_ip, workers=args.workers,
                           cpus_per_worker=args.ray_cpus, gpus_per_worker=args.ray_gpus, retries=args.ray_retries)
    return RayExecutor(settings, root)


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
    from graph.inference.server import serve

    serve(args.model, host=args.host, port=args.port, served_name=args.served_model_name, max_tokens=args.max_tokens)
    return 0


#: Each command group's subcommands, so that several packages can add to one group (``eval``, ``bench``).
_GROUPS: "weakref.WeakKeyDictionary[argparse.ArgumentParser, Any]" = weakref.WeakKeyDictionary()


def command_group(sub: Any, name: str, help: str) -> Any:
    """The subcommands of group `name` under `sub` (created on first use), for ``anomaly-agent NAME ...``."""
    parser = sub.choices.get(name)
    if parser is None:
        parser = sub.add_parser(name, help=help)
        _GROUPS[parser] = parser.add_subparsers(dest=f"{name}_command", required=True)
    return _GROUPS[parser]


def add_passthrough(group: Any, name: str, help: str, main: Callable[[list[str]], int | None]) -> None:
    """A subcommand whose arguments all go to `main(argv)` (a benchmark's own parser, with its own --help)."""
    parser = group.add_parser(name, help=help, add_help=False)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="the benchmark's arguments (see its --help)")
    parser.set_defaults(func=lambda args: int(main(args.argv) or 0), passthrough=True)


def run_options(p: argparse.ArgumentParser) -> None:
    """The flags every command that runs the graph shares (read back by `run_overrides`)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="YAML file with configuration keys (see README)")
    p.add_argument("--policy", choices=["scripted", "openai", "local"])
    p.add_argument("--base-url", dest="base_url")
    p.add_argument("--model", help="model name (openai) or local model folder (local; default SmolLM2-135M-Instruct)")
    p.add_argument("--temperature", type=float, help="policy sampling temperature (default 0: greedy)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="most tokens per policy turn")


def register(sub: Any) -> None:
    """Add the graph's commands to the `anomaly-agent` subcommands `sub`."""
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
    p.add_argument("--per-image", type=_count(1, 1000), default=1,  # 1000: graph.batch.MAX_PER_IMAGE
                   help="samples per image and type (1-1000)")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=_count(1),
                   help="processes (default 1), or Ray workers (default: as many as the cluster holds)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted batch in the same --out")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray: alone, a local instance; auto, HOST:PORT or ray://HOST:PORT joins a cluster "
                        "(--out must be a folder every node sees)")
    p.add_argument("--ray-node-ip", dest="ray_node_ip", help="this driver's node address (e.g. 127.0.0.2); default: Ray's choice")
    p.add_argument("--ray-cpus", dest="ray_cpus", type=float, default=1.0, help="CPUs per Ray worker (default 1)")
    p.add_argument("--ray-gpus", dest="ray_gpus", type=float,
                   help="GPUs per Ray worker (default: 1 when a model backend runs on a GPU and the cluster has one)")
    p.add_argument("--ray-retries", dest="ray_retries", type=int, default=3,
                   help="restarts of a lost Ray worker; its sample is retried on the restarted worker (default 3)")
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

    p = sub.add_parser("kb", help="the knowledge base")
    kb = p.add_subparsers(dest="kb_command", required=True)
    q = kb.add_parser("list", help="categories and their defect types")
    q.add_argument("--dataset", choices=["mvtec_ad", "visa"])
    q.set_defaults(func=cmd_kb_list)

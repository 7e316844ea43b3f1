"""The `anomaly-agent` command line: the one module that sees every package.

Each package contributes its command group through `register(subparsers)` and names its exceptions
written for the user through `user_errors()`. Why errors are caught here and nowhere deeper: library
code raises exceptions with messages written for the user; the command line is the edge where a known
error becomes one line on stderr and exit code 2, and only an unexpected bug shows a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn

from evals import commands as eval_commands
from graph import cli as graph_commands
from training import commands as training_commands

#: The packages' command groups, in the order `--help` lists them.
PACKAGES = (graph_commands, eval_commands, training_commands)


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr (exit 2), like every other user error of the CLI.

    Subcommand parsers inherit the class (argparse makes them with the parent's type).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole `anomaly-agent` parser: every package's commands."""
    parser = OneLineParser(prog="anomaly-agent", description="Synthesize realistic industrial defects with pixel masks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of each step")
    sub = parser.add_subparsers(dest="command", required=True)
    for package in PACKAGES:
        package.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (2 for a user error, 130 when interrupted)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.argv = extra + args.argv  # a benchmark's leading options come back as `extra`; the rest in order
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    errors = tuple(error for package in PACKAGES for error in package.user_errors())
    try:
        return func(args)
    except errors as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"anomaly-agent: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anomaly-agent: interrupted; rerun a batch with --resume to finish it", file=sys.stderr)
        return 130

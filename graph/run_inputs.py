"""A run's own inputs checked at its start: where it writes (`run_dir`) and its `seed`.

Why a served graph confines `run_dir`: anyone who can reach a LangGraph server can start a run, so a
caller's `run_dir` must never make the server write outside the folder its operator chose
(`run_root`). A graph built in-process (`build_graph()`: the CLI, batches, training) trusts its
caller, who already chooses where its files go.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any


class RunInputError(ValueError):
    """An input of a run is invalid; the one-line message names the input."""


def resolve_run_dir(run_dir: str | None, run_root: str, *, confined: bool) -> Path:
    """The absolute folder a run writes to.

    Without `run_dir`: a new folder under `run_root`. Confined (a served graph): `run_dir` must be a name
    or a relative path that stays inside `run_root` once symlinks are followed; `..` and absolute paths
    are refused. Not confined: `run_dir` as given, relative to the working directory.
    """
    root = Path(run_root).expanduser().resolve()
    if not run_dir:
        return root / uuid.uuid4().hex[:12]
    if not isinstance(run_dir, str):
        raise RunInputError(f"input 'run_dir' must be a string, not {type(run_dir).__name__}")
    if not confined:
        return Path(run_dir).expanduser().resolve()
    given = Path(run_dir)
    if given.is_absolute() or run_dir.startswith("~"):
        raise RunInputError(f"input 'run_dir' must be a name or a relative path inside run_root, not {run_dir!r}")
    if ".." in given.parts:
        raise RunInputError(f"input 'run_dir' may not contain '..': {run_dir!r}")
    target = (root / given).resolve()  # follows symlinks: a link inside the root may not lead out of it
    if target != root and not target.is_relative_to(root):
        raise RunInputError(f"input 'run_dir' {run_dir!r} leads outside run_root (through a symlink)")
    if target == root:
        raise RunInputError(f"input 'run_dir' must name a folder inside run_root, not the root itself: {run_dir!r}")
    return target


def check_seed(value: Any, default: int) -> int:
    """The run's seed: an integer (or a string of one); `default` when the input gives none."""
    if value is None or value == "":
        return int(default)
    if isinstance(value, bool):
        raise RunInputError(f"input 'seed' must be an integer, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise RunInputError(f"input 'seed' must be an integer, not {value!r}")

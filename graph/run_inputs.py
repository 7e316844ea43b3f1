"""A run's own inputs checked at its start: what it reads (`image`), where it writes (`run_dir`), its `seed`.

Why a served graph confines `image` and `run_dir`: anyone who can reach a LangGraph server can start a
run, so a caller's paths must never make the server read or write outside the folders its operator
chose (`input_root`, `run_root`). A graph built in-process (`build_graph()`: the CLI, batches,
training) trusts its caller, who already chooses which files it reads and writes, unless `input_root`
is set.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from tools.imaging import is_data_url

#: Where a served run's image files must be when the server sets no `input_root` (relative: to its working directory).
DEFAULT_INPUT_ROOT = "inputs"


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
    target = _inside(run_dir, root, field="run_dir", root_name="run_root", absolute=False)
    if target == root:
        raise RunInputError(f"input 'run_dir' must name a folder inside run_root, not the root itself: {run_dir!r}")
    return target


def resolve_image(image: Any, input_root: str | None, *, confined: bool) -> str:
    """The image source a run reads: a data URL as given; a file path as given, or checked to lie in `input_root`.

    Confined (a served graph, or any graph when `input_root` is set): the path must resolve, after
    symlinks, inside `input_root` (`DEFAULT_INPUT_ROOT` when unset); a relative path is taken inside it,
    an absolute one must point into it, and `..` is refused.
    """
    if not isinstance(image, str):
        raise RunInputError(f"input 'image' must be a file path or a data URL, not {type(image).__name__}")
    if is_data_url(image) or not (confined or input_root):
        return image
    root = Path(input_root or DEFAULT_INPUT_ROOT).expanduser().resolve()
    return str(_inside(image, root, field="image", root_name="input_root", absolute=True))


def _inside(value: str, root: Path, *, field: str, root_name: str, absolute: bool) -> Path:
    """`value` resolved inside the resolved `root`, or a `RunInputError` naming `field`.

    `absolute`: whether an absolute path (into the root) is accepted; relative paths are taken in the root.
    """
    given = Path(value)
    if (given.is_absolute() and not absolute) or value.startswith("~"):
        where = "a name or a relative path" if not absolute else "a path"
        raise RunInputError(f"input '{field}' must be {where} inside {root_name}, not {value!r}")
    if ".." in given.parts:
        raise RunInputError(f"input '{field}' may not contain '..' (it must stay inside {root_name}): {value!r}")
    target = (root / given).resolve()  # follows symlinks: a link inside the root may not lead out of it
    if target != root and not target.is_relative_to(root):
        how = " (through a symlink)" if (root / given).is_relative_to(root) else ""
        raise RunInputError(f"input '{field}' {value!r} leads outside {root_name}{how}")
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

"""Reading a training job's YAML file into its config dataclass (shared by `train sft` and `train grpo`).

Why one reader: both commands promise the same things about their files - a missing file, bad YAML, a
non-mapping, an unknown key (with the known ones listed) or a missing required key is one clear line
naming the file - and CLI flags override the file's values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def read_job_yaml(path: str | Path, overrides: dict[str, Any], *, required: tuple[str, ...], error: type[Exception],
                  what: str) -> dict[str, Any]:
    """The YAML mapping at `path` with the non-None `overrides` on top.

    Raises:
        error: the file is missing, not valid YAML or not a mapping, or a required key is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a mapping of keys to values")
    data.update({k: v for k, v in overrides.items() if v is not None})
    missing = [n for n in required if n not in data]
    if missing:
        raise error(f"{path} must set {', '.join(missing)}")
    return data


def load_job_yaml(cls: type[T], path: str | Path, overrides: dict[str, Any], *, required: tuple[str, ...],
                  error: type[Exception], what: str) -> T:
    """`cls(**fields)` from `read_job_yaml`, every key one of the dataclass's fields.

    Raises:
        error: the file is missing or not a mapping, a key is unknown, or a required one is missing.
    """
    data = read_job_yaml(path, overrides, required=(), error=error, what=what)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"{path} has unknown keys: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    missing = [n for n in required if n not in data]
    if missing:
        raise error(f"{path} must set {', '.join(missing)}")
    return cls(**data)

"""Every dotted name of ours that the docs, docstrings and configs mention imports.

Why: a user copies such names into commands and configs (`--worker-extension-cls
training.grpo_sync.ReloadWorkerExtension`); a stale one fails only when that command runs.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("graph", "tools", "training", "evals")
NAME = re.compile(rf"(?<![\w./-])((?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def documented_names() -> dict[str, str]:
    """Dotted names under our packages -> the first file that mentions them."""
    files = [ROOT / "README.md"]
    for package in PACKAGES:
        files += sorted(p for p in (ROOT / package).rglob("*") if p.suffix in {".py", ".yaml", ".md"})
    names: dict[str, str] = {}
    for path in files:
        for match in NAME.finditer(path.read_text(errors="ignore")):
            names.setdefault(match.group(1), str(path.relative_to(ROOT)))
    return names


def resolve(name: str) -> object:
    """The object a dotted name means: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            target = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(name)


def test_every_documented_qualname_imports():
    names = documented_names()
    assert "training.grpo_sync.ReloadWorkerExtension" in names and len(names) > 50
    broken = []
    for name, where in sorted(names.items()):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            broken.append(f"{name} ({where}): {error}")
    assert broken == []

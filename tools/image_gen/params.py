"""The engine's data: sub-region placement rules and per-type adjustments, read from ``types.yaml``.

Why data: which part of a product a knowledge-base sub-region names ("rim", "tip", "thread") and how
much bigger or stronger one type must be drawn than its size and contrast words say are facts about the
datasets, not about the drawing code; they belong beside the knowledge base, where they can be read and
changed without touching a renderer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

#: Placement rules a sub-region may map to (see types.yaml).
RULES = ("edge", "ends", "sides", "center", "interior", "top", "bottom", "left", "right", "anywhere")


@dataclass(frozen=True)
class TypeParams:
    """Adjustments of the engine's defaults for one defect type."""

    extent: float = 1.0
    strength: float = 1.0


@lru_cache(maxsize=1)
def _load() -> dict:
    text = resources.files("tools.image_gen").joinpath("types.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    for name, rule in (data.get("regions") or {}).items():
        if rule not in RULES:
            raise ValueError(f"tools/image_gen/types.yaml: region {name!r} has rule {rule!r}; use one of {RULES}")
    for name, values in (data.get("types") or {}).items():
        unknown = set(values or {}) - set(TypeParams.__dataclass_fields__)
        if unknown:
            raise ValueError(f"tools/image_gen/types.yaml: type {name!r} has unknown keys {sorted(unknown)}")
    return data


def region_rule(region: str | None) -> str | None:
    """The placement rule of a knowledge-base sub-region (first known word wins), or None."""
    if not region:
        return None
    regions = _load().get("regions") or {}
    for word in region.lower().replace("-", " ").replace("_", " ").split():
        if word in regions:
            return regions[word]
    return None


def type_params(category: str, anomaly_type: str) -> TypeParams:
    """The adjustments for (category, type): the category-specific entry, else the bare type's, else none."""
    types = _load().get("types") or {}
    values = types.get(f"{category}/{anomaly_type}") or types.get(anomaly_type) or {}
    return TypeParams(**values)

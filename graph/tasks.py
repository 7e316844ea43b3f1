"""Agent tasks for evaluating and training a policy: sample images paired with their category's defect types.

Why in the graph package: the policy evaluation and GRPO both draw their task sets here, so a task
seed means the same images and defects to both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Task:
    """One run to make: a normal image, its category, the defect to synthesize and the run seed."""

    image: str
    category: str
    anomaly_type: str
    seed: int


def make_tasks(folder: Path, count: int, seed: int = 0, size: int = 128) -> list[Task]:
    """`count` tasks: sample images (tools.samples) × the catalog's defect types of their category.

    The pairs are shuffled with `seed` and taken in order (cycling when `count` is larger), so the same
    arguments always give the same tasks.
    """
    from tools.knowledge.catalog import load_catalog
    from tools.samples import make_samples

    if count < 1:
        raise ValueError("--tasks must be at least 1")
    catalog = load_catalog()
    samples = make_samples(folder, size=size, per_category=2, seed=seed)
    pairs = [
        (item["path"], item["category"], defect)
        for item in samples
        for defect in catalog.category(item["category"]).defects
    ]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [
        Task(pairs[order[i % len(pairs)]][0], pairs[order[i % len(pairs)]][1], pairs[order[i % len(pairs)]][2], seed * 1000 + i)
        for i in range(count)
    ]

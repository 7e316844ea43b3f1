"""What every baseline generator returns, and a stopwatch for its stages (for `bench generators`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Stages:
    """Seconds spent per named stage, accumulated over calls."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


@dataclass
class Synthetic:
    """One synthetic anomaly: the edited uint8 RGB image, its bool mask and the time per stage."""

    image: np.ndarray
    mask: np.ndarray
    stages: dict[str, float]


def allowed_area(image: np.ndarray, category: str, stages: Stages) -> np.ndarray:
    """Where a type-agnostic baseline may draw: the whole frame of a texture, the product of an object
    (as DRAEM restricts its masks to the foreground); timed as the stage "foreground"."""
    from tools.foreground import estimate_foreground
    from tools.knowledge.catalog import load_catalog

    with stages.time("foreground"):
        if load_catalog().category(category).is_texture:
            return np.ones(image.shape[:2], bool)
        return estimate_foreground(image, False)


class Baseline(Protocol):
    """A defect generator that needs no agent: one call, one image + mask."""

    name: str

    def __call__(
        self, image: np.ndarray, category: str, anomaly_type: str, rng: np.random.Generator
    ) -> Synthetic: ...

"""A third-party generator: the registry package `defect-synthesis` (scratches, cracks, stains, pitting,
burns, warping on a seed image, each with its mask), called through its public API, never copied.

Why: a transfer benchmark needs anomalies that none of our own code made; a detector trained on our
output is tested on these. The package draws its randomness from Python's global `random` and numpy's
global generator and works on OpenCV's BGR order: each call seeds both from the caller's generator,
restores their previous state afterwards, and converts RGB <-> BGR. Its size parameters are written
for images of a few hundred pixels; they are scaled by the image side / 256 (its other parameters are
its defaults). One of the six modalities is drawn per call; on objects the defect is kept on the
product (its ROI option). The defect type is ignored: the package does not know our types.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from evals.baselines.base import Stages, Synthetic, allowed_area

#: Tries before giving up on a modality that drew nothing inside the allowed area.
TRIES = 8


def _scaled(lo: int, hi: int, k: float, floor: int = 1) -> tuple[int, int]:
    a = max(floor, int(round(lo * k)))
    return a, max(a, int(round(hi * k)))


def modalities(side: int) -> dict[str, Callable[[], Any]]:
    """The package's six generators, their size ranges scaled to an image of `side` pixels."""
    try:
        import defect_synthesis as ds
    except ImportError as error:
        from evals.errors import EvalError

        raise EvalError(
            "the defect_synthesis generator needs the registry package: pip install 'anomaly-agent[eval]'"
        ) from error

    k = side / 256.0
    return {
        "scratch": lambda: ds.ScratchGenerator(length_range=_scaled(30, 150, k, 8), width_range=(1, 3)),
        "crack": lambda: ds.CrackGenerator(base_length_range=_scaled(60, 200, k, 12)),
        "stain": lambda: ds.StainGenerator(
            radius_range=_scaled(20, 80, k, 4), stain_type=random.choice(["oil", "rust", "water"])
        ),
        "pitting": lambda: ds.PittingGenerator(
            pit_radius_range=_scaled(2, 7, k), spread_radius=max(6, int(40 * k))
        ),
        "burn": lambda: ds.BurnGenerator(radius_range=_scaled(15, 60, k, 4)),
        "warp": lambda: ds.TextureWarpGenerator(warp_radius_range=_scaled(30, 90, k, 6)),
    }


@contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Seed Python's and numpy's global generators for the duration, then put their state back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class DefectSynthesis:
    """One defect of a random `defect-synthesis` modality, with the package's own mask."""

    name = "defect_synthesis"

    def __call__(
        self, image: np.ndarray, category: str, anomaly_type: str, rng: np.random.Generator
    ) -> Synthetic:
        stages = Stages()
        roi = allowed_area(image, category, stages).astype(np.uint8) * 255
        makers = modalities(min(image.shape[:2]))
        names = sorted(makers)
        bgr = np.ascontiguousarray(image[..., ::-1])
        with stages.time("defect_synthesis"), seeded_globals(int(rng.integers(0, 2**31))):
            modality = names[int(rng.integers(0, len(names)))]
            for _ in range(TRIES):
                result = makers[modality]().apply(bgr, roi_mask=roi)
                if result.has_defect:
                    break
        out = np.ascontiguousarray(np.asarray(result.image, np.uint8)[..., ::-1])
        return Synthetic(out, np.asarray(result.anomaly_mask) > 0, {**stages.seconds, modality: 0.0})

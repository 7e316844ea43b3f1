"""DRAEM-style baseline (Zavrtanik et al. 2021): a thresholded Perlin-noise mask filled with a foreign texture.

Why: it is the most used synthetic-anomaly generator in detector training. DRAEM draws its textures from
DTD, which no registry ships; we draw them from the photographs bundled with scikit-image (brick, grass,
gravel, coffee, a cat, a rocket...), randomly cropped, tinted and gamma-adjusted, which plays the same
role: structure the product never has. As in DRAEM, the texture is blended with opacity 1 - beta,
beta ~ U(0, 0.8), and the Perlin noise has 2^k lattice cells per axis. On objects the mask is kept on the
product (DRAEM's foreground restriction). The defect type is ignored: DRAEM does not know about types.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from skimage import data, transform

from evals.baselines.base import Stages, Synthetic, allowed_area
from evals.baselines.perlin import perlin

TEXTURE_SOURCES = ("brick", "grass", "gravel", "coffee", "chelsea", "rocket", "astronaut", "camera", "moon")
THRESHOLD = 0.5
MIN_MASK_PIXELS = 16


@cache
def _source(name: str) -> np.ndarray:
    img = getattr(data, name)().astype(np.float32)
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


def texture_patch(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random crop of a bundled photograph, resized to `shape`, with random tint and gamma (float 0..255)."""
    src = _source(str(rng.choice(TEXTURE_SOURCES)))
    side = int(min(src.shape[:2]) * rng.uniform(0.3, 0.9))
    y = int(rng.integers(0, src.shape[0] - side + 1))
    x = int(rng.integers(0, src.shape[1] - side + 1))
    crop = transform.resize(
        src[y : y + side, x : x + side], shape, order=1, anti_aliasing=True, preserve_range=True
    )
    gamma = rng.uniform(0.5, 2.0)
    tinted = 255.0 * (np.clip(crop, 0, 255) / 255.0) ** gamma * rng.uniform(0.6, 1.2, 3)
    return np.clip(tinted, 0, 255).astype(np.float32)


def perlin_mask(
    shape: tuple[int, int], allowed: np.ndarray, rng: np.random.Generator, tries: int = 20
) -> np.ndarray:
    """Perlin noise above `THRESHOLD` inside `allowed`; redrawn until it has some pixels."""
    mask = np.zeros(shape, bool)
    for _ in range(tries):
        cells = (2 ** int(rng.integers(0, 5)), 2 ** int(rng.integers(0, 5)))
        mask = (perlin(shape, cells, rng) > THRESHOLD) & allowed
        if mask.sum() >= MIN_MASK_PIXELS:
            break
    return mask


class Draem:
    """Perlin mask x foreign texture, blended with a random opacity."""

    name = "draem"

    def __call__(
        self, image: np.ndarray, category: str, anomaly_type: str, rng: np.random.Generator
    ) -> Synthetic:
        stages = Stages()
        shape = image.shape[:2]
        allowed = allowed_area(image, category, stages)
        with stages.time("mask"):
            mask = perlin_mask(shape, allowed, rng)
        with stages.time("texture"):
            texture = texture_patch(shape, rng)
        with stages.time("blend"):
            beta = rng.uniform(0.0, 0.8)
            m = mask[..., None].astype(np.float32)
            base = image.astype(np.float32)
            out = base * (1 - m) + (1 - beta) * texture * m + beta * base * m
        return Synthetic(np.clip(np.round(out), 0, 255).astype(np.uint8), mask, stages.seconds)

"""2-D Perlin noise with an explicit generator: the mask source of DRAEM-style anomalies."""

from __future__ import annotations

import numpy as np


def perlin(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient noise in about [-1, 1] with `cells` lattice cells along (y, x) (Perlin 2002, fade 6t^5-15t^4+10t^3).

    Args:
        shape: Output (H, W).
        cells: Lattice cells per axis; larger means finer blobs.
        rng: Source of the random gradient directions.

    Returns:
        float32 (H, W).
    """
    h, w = shape
    cy, cx = cells
    angles = rng.uniform(0, 2 * np.pi, (cy + 1, cx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, cy, h, endpoint=False)
    x = np.linspace(0, cx, w, endpoint=False)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - yi)[:, None], (x - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return (np.sqrt(2) * (top * (1 - uy) + bottom * uy)).astype(np.float32)

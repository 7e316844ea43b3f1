"""CutPaste-scar baseline (Li et al. 2021): a thin rotated patch of the image itself, colour-jittered,
pasted elsewhere on it.

Why: CutPaste's anomalies are made of the product's own pixels, so they test whether a detector learns
structure breaks rather than foreign colours. Sizes follow the paper's scar (width 2-16 px, length
10-25 px at 256 px), scaled to the image side; rotation -45..45 degrees; brightness, contrast and
saturation jitter 0.1 and hue jitter ~0.1. The mask is the pasted (rotated) rectangle. On objects the
paste lands on the product. The defect type is ignored.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from evals.baselines.base import Stages, Synthetic, allowed_area


def colour_jitter(patch: np.ndarray, rng: np.random.Generator, amount: float = 0.1) -> np.ndarray:
    """Brightness, contrast, saturation and a hue-like channel mix, each by up to `amount` (float RGB)."""
    x = patch * rng.uniform(1 - amount, 1 + amount)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - amount, 1 + amount) + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(1 - amount, 1 + amount) + grey
    shift = rng.uniform(-amount, amount)
    x = x * (1 - abs(shift)) + np.roll(x, 1 if shift > 0 else -1, axis=2) * abs(shift)
    return np.clip(x, 0, 255)


class CutPasteScar:
    """Cut a thin rectangle, jitter its colour, rotate it, paste it elsewhere."""

    name = "cutpaste_scar"

    def __call__(
        self, image: np.ndarray, category: str, anomaly_type: str, rng: np.random.Generator
    ) -> Synthetic:
        stages = Stages()
        h, w = image.shape[:2]
        k = min(h, w) / 256.0
        allowed = allowed_area(image, category, stages)
        with stages.time("cut"):
            pw = max(2, int(round(rng.uniform(2, 16) * k)))
            ph = max(4, int(round(rng.uniform(10, 25) * k)))
            y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
            patch = colour_jitter(image[y0 : y0 + ph, x0 : x0 + pw].astype(np.float32), rng)
            angle = rng.uniform(-45, 45)
            rotated = ndi.rotate(patch, angle, axes=(1, 0), reshape=True, order=1)
            alpha = ndi.rotate(np.ones((ph, pw), np.float32), angle, axes=(1, 0), reshape=True, order=1) > 0.5
        with stages.time("paste"):
            rh, rw = alpha.shape
            ys, xs = (
                np.nonzero(allowed[: h - rh + 1, : w - rw + 1])
                if h > rh and w > rw
                else (np.array([0]), np.array([0]))
            )
            if ys.size == 0:
                ys, xs = np.array([(h - rh) // 2]), np.array([(w - rw) // 2])
            i = int(rng.integers(0, ys.size))
            ty, tx = int(ys[i]), int(xs[i])
            out = image.astype(np.float32)
            mask = np.zeros((h, w), bool)
            region = out[ty : ty + rh, tx : tx + rw]
            region[alpha] = rotated[alpha]
            mask[ty : ty + rh, tx : tx + rw] = alpha
        return Synthetic(np.clip(np.round(out), 0, 255).astype(np.uint8), mask, stages.seconds)

"""Colour operations that change a surface while keeping its texture and shading.

Why: a pasted flat colour is the easiest defect to spot as fake. Every change here is relative to the
surface under it: darkening multiplies (texture scales with it, as with an absorbing stain), lightening
screens towards white (texture compresses, as with a reflective scratch), tinting replaces the hue and
keeps the local shading ratio. Words map to magnitudes in one place (`CONTRAST_DELTA`,
`TINT_STRENGTH`, `edge_sigma`), so "low contrast" means the same for every family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage import color

from tools.vocabulary import COLOURS, DefectSpec

#: Luminance change (0..255 levels) per contrast word. Low is still perceptible on any surface
#: (about ΔL* 8), high is clearly visible without being garish.
CONTRAST_DELTA: dict[str, float] = {"low": 26.0, "medium": 45.0, "high": 72.0}

#: How far a named colour replaces the surface colour, per contrast word.
TINT_STRENGTH: dict[str, float] = {"low": 0.42, "medium": 0.65, "high": 0.88}

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass
class Stamp:
    """One rendered defect: the edited window of the image, the defect's strength there, and parameters.

    Attributes:
        image: The window with this defect applied, float32 (h, w, 3), 0..255.
        alpha: The defect's relative strength in [0, 1] over the window: geometric coverage times any
            fading (tapered line ends). Where it is at least 0.5 the pixel belongs to the defect; faint
            context effects (a scratch's lip, a strand's shadow) stay below 0.5 by design.
        box: (x0, y0, x1, y1) of the window in the full image, x1/y1 exclusive.
        info: The concrete sampled parameters, JSON-serialisable.
    """

    image: np.ndarray
    alpha: np.ndarray
    box: tuple[int, int, int, int]
    info: dict[str, Any] = field(default_factory=dict)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel max over RGB of |a - b|, float32 (H, W). (Much faster than `.max(axis=-1)`.)"""
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return np.maximum(np.maximum(d[..., 0], d[..., 1]), d[..., 2])


def luminance(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of an RGB image, float32 (H, W) in 0..255."""
    return (np.asarray(image, np.float32) @ _LUMA).astype(np.float32)


def local_mean(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian local mean over the spatial axes (channels kept apart)."""
    s = (sigma, sigma, 0) if x.ndim == 3 else sigma
    return ndi.gaussian_filter(np.asarray(x, np.float32), sigma=s, mode="nearest")


def edge_sigma(softness: str, extent: float) -> float:
    """Edge blur in pixels: crisp but anti-aliased for "sharp", proportional to the defect for "soft".

    Args:
        softness: "sharp" or "soft".
        extent: Characteristic size of the defect in pixels (radius or width).
    """
    if softness == "soft":
        return float(max(1.5, 0.22 * extent))
    return 0.55


def named_rgb(colour: str) -> np.ndarray | None:
    """RGB for a named colour of the vocabulary, None for relative words (dark, light, transparent)."""
    rgb = COLOURS.get(colour)
    return None if rgb is None else np.asarray(rgb, np.float32)


def polarity(colour: str, surface_luma: float, delta: float) -> int:
    """Sign of the luminance change: -1 darker, +1 lighter.

    "dark" darkens and "light" lightens, unless the surface has no room for that change (a dark
    defect on a nearly black surface), in which case the sign flips so the defect stays visible.
    Named colours move towards the colour's own luminance.

    Args:
        colour: Colour word of the spec.
        surface_luma: Mean luminance of the surface under the defect (0..255).
        delta: Requested change magnitude in levels.
    """
    rgb = named_rgb(colour)
    if rgb is not None:
        want = -1 if float(rgb @ _LUMA) < surface_luma else 1
    else:
        want = 1 if colour == "light" else -1
    if want < 0 and surface_luma - 0.7 * delta < 12:
        return 1
    if want > 0 and surface_luma + 0.7 * delta > 245:
        return -1
    return want


def change_luminance(image: np.ndarray, weight: np.ndarray, delta: float, sigma: float = 2.0) -> np.ndarray:
    """Darken (delta < 0) or lighten (delta > 0) by about |delta| levels where weight is 1.

    Darkening multiplies by the factor that takes the local mean luminance down by |delta|, so the
    texture's relative contrast is kept; lightening screens towards white by the factor that takes it
    up by delta.

    Args:
        image: float32 RGB (H, W, 3) 0..255.
        weight: (H, W) in [0, 1], coverage times any strength modulation.
        delta: Signed change in levels.
        sigma: Scale of the local mean used as "the surface level".

    Returns:
        float32 RGB, same shape.
    """
    img = np.asarray(image, np.float32)
    lm = np.maximum(local_mean(luminance(img), sigma), 1.0)
    w = np.clip(weight, 0.0, None)[..., None]
    if delta < 0:
        f = np.clip((lm + delta) / lm, 0.04, 1.0)[..., None]
        out = img * (1.0 + w * (f - 1.0))
    else:
        g = np.clip(delta / np.maximum(255.0 - lm, 1.0), 0.0, 0.85)[..., None]
        out = img + (255.0 - img) * np.clip(w * g, 0.0, 1.0)
    return np.clip(out, 0, 255).astype(np.float32)


def tint(image: np.ndarray, weight: np.ndarray, rgb: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Dye the surface towards `rgb`: its hue and chroma are taken over, its lightness pattern is kept.

    Why in Lab: a real stain or paint colours the surface under it; every grain, scratch and shading
    gradient of the surface still shows through. Replacing the colour and scaling only the finest texture
    (as a flat fill with a shading ratio does) reads as a sticker. Here the lightness keeps all of its
    variation and only its mean moves half-way towards the colour's lightness; a and b move to the
    colour's.

    Args:
        image: float32 RGB 0..255.
        weight: (H, W) blend weight in [0, 1].
        rgb: Target colour (3,).
        sigma: Unused; kept for callers that pass the old texture scale.

    Returns:
        float32 RGB.
    """
    del sigma
    img = np.clip(np.asarray(image, np.float32), 0, 255)
    w = np.clip(weight, 0.0, 1.0)
    if not (w > 0.01).any():
        return img.copy()
    ys, xs = np.nonzero(w > 0.01)
    win = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    lab = color.rgb2lab(img[win] / 255.0)
    target = color.rgb2lab(np.asarray(rgb, np.float32).reshape(1, 1, 3) / 255.0)[0, 0]
    ww = w[win]
    inside = ww >= 0.5
    mean_l = float(lab[..., 0][inside].mean()) if inside.any() else float(lab[..., 0].mean())
    out = lab.copy()
    out[..., 0] = lab[..., 0] + ww * 0.55 * (target[0] - mean_l)
    out[..., 1] = lab[..., 1] + ww * (target[1] - lab[..., 1])
    out[..., 2] = lab[..., 2] + ww * (target[2] - lab[..., 2])
    result = img.copy()
    result[win] = np.clip(color.lab2rgb(out) * 255.0, 0, 255)
    return result.astype(np.float32)


def composite(base: np.ndarray, top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite `top` over `base` (both float RGB) with coverage `alpha` (H, W)."""
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    return (base * (1.0 - a) + top * a).astype(np.float32)


def surface_change(
    image: np.ndarray, weight: np.ndarray, spec: DefectSpec, delta: float, surface_luma: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """The common "colour word" change: tint for named colours, darken/lighten otherwise.

    Args:
        image: float32 RGB.
        weight: (H, W) coverage × strength.
        spec: Gives the colour word and contrast.
        delta: Luminance change magnitude (levels) for relative colours.
        surface_luma: Mean luminance under the defect, to choose the sign.

    Returns:
        (edited image, info with "colour_rgb" or "polarity" and the magnitude used).
    """
    rgb = named_rgb(spec.colour)
    if rgb is not None:
        strength = TINT_STRENGTH[spec.contrast]
        return tint(image, weight * strength, rgb), {
            "colour_rgb": rgb.astype(int).tolist(),
            "tint_strength": strength,
        }
    sign = polarity(spec.colour, surface_luma, delta)
    return change_luminance(image, weight, sign * delta), {
        "polarity": "light" if sign > 0 else "dark",
        "delta": delta,
    }


def texture_contrast(image: np.ndarray, alpha: np.ndarray) -> float:
    """How strong a change must be to stand out from the surface around a defect, in levels.

    The spread (standard deviation) of the surface's luminance in a ring around the defect, plus 5
    levels: a change of that size is as strong as the surface's own swings, so it reads as something
    on the surface rather than part of its pattern. QE's visibility check uses the same scale.
    """
    core = alpha >= 0.5
    if core.sum() < 3:
        return 0.0
    ring = ndi.binary_dilation(core, iterations=6) & ~ndi.binary_dilation(core, iterations=2)
    if ring.sum() < 8:
        ring = ~core
    if ring.sum() < 8:
        return 0.0
    return float(luminance(image)[ring].std()) + 5.0

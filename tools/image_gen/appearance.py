"""Appearance diversity: how big, how strong, how soft, how ragged and how textured one defect is.

Why distributions, not fixed values: real defects of one type range from barely visible to blatant and
from a few pixels to a large share of the part. A detector trained on one strong, clean, mid-sized look
learns that look. Each word of the instruction therefore names a *range* (log-uniform, overlapping its
neighbours), and an attribute the instruction leaves unstated is drawn from the union of its words' ranges,
the type's broad distribution. A per-type multiplier (types.yaml) and the knowledge entry (through PG's
words) steer them.

`sample_look` draws a `Look` from an explicit generator; `finish_stamp` applies the parts every family
shares after its renderer has drawn the shape: texture-statistics disturbance on texture surfaces, a
textured interior (fractal noise, a material texture, or the image's own content displaced), edge
softness and camera blur, and the contrast the look asks for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools.image_gen.blending import texture_contrast
from tools.image_gen.camera import blur_change, luminance
from tools.image_gen.shapes import coords, fractal_noise
from tools.vocabulary import DefectSpec

#: Defect extent (fraction of the product's equivalent diameter) per size word, log-uniform.
SIZE_RANGE: dict[str, tuple[float, float]] = {
    "tiny": (0.004, 0.03),
    "small": (0.02, 0.09),
    "medium": (0.05, 0.2),
    "large": (0.12, 0.55),
}
#: Mean luminance change inside the defect (levels) per contrast word, log-uniform.
CONTRAST_RANGE: dict[str, tuple[float, float]] = {"low": (3.0, 16.0), "medium": (10.0, 40.0), "high": (28.0, 90.0)}
#: Extra edge blur as a fraction of the defect's extent per softness word (sharp: at most a pixel).
SOFTNESS_RANGE: dict[str, tuple[float, float]] = {"sharp": (0.0, 0.015), "soft": (0.02, 0.12)}
#: Fractal outline amplitude (fraction of the radius) per outline word.
OUTLINE_RANGE: dict[str, tuple[float, float]] = {"smooth": (0.0, 0.05), "ragged": (0.08, 0.3)}
#: Smallest contrast per contrast word in units of the surface's own spread around the defect
#: (`blending.texture_contrast`): a "high contrast" defect stands out even on a busy surface, a "low"
#: one may hide in it (real faint defects do).
SURFACE_FLOOR: dict[str, float] = {"low": 0.0, "medium": 1.2, "high": 1.55}
#: Modulation depth of the interior per interior word.
INTERIOR_RANGE: dict[str, tuple[float, float]] = {"uniform": (0.05, 0.15), "mottled": (0.15, 0.35), "textured": (0.3, 0.6)}
#: Line width as a fraction of the line's extent (log-uniform).
WIDTH_RANGE = (0.02, 0.25)
#: Interior texture sources.
INTERIOR_KINDS = ("fractal", "material", "displaced")
#: Local texture-statistics disturbances drawn on texture surfaces (weave or grain distortion, local
#: contrast change, local frequency change).
TEXTURE_OPS = ("warp", "contrast", "frequency")
#: How far the contrast gain may scale each family's change: moved or replaced pixels (deformation,
#: texture, missing) are not faded far (a ghost of two images) and amplified only where they were
#: re-shaded (see `finish_stamp`).
GAIN_LIMITS: dict[str, tuple[float, float]] = {
    "blob": (0.04, 6.0),
    "line": (0.04, 6.0),
    "hole": (0.04, 6.0),
    "deformation": (0.15, 1.5),
    "texture": (0.15, 1.5),
    "missing": (0.5, 1.5),
}


def _log_uniform(lo: float, hi: float, u: float) -> float:
    return float(lo * (hi / lo) ** u) if lo > 0 else float(lo + (hi - lo) * u)


def _word_range(table: dict[str, tuple[float, float]], word: str | None) -> tuple[float, float]:
    """The word's range, or the union of all of them (the broad distribution) when there is no word."""
    if word in table:
        return table[word]  # type: ignore[index]
    return min(v[0] for v in table.values()), max(v[1] for v in table.values())


@dataclass
class Look:
    """The sampled appearance of one defect (JSON-serialisable through `as_info`)."""

    extent_frac: float
    width_frac: float
    contrast: float
    surface_floor: float
    softness_frac: float
    ragged: float
    interior: str
    interior_amp: float
    texture_op: str | None

    def as_info(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def sample_look(spec: DefectSpec, rng: np.random.Generator, *, is_texture: bool, strength: float = 1.0) -> Look:
    """Draw one defect's appearance from the ranges its words name.

    Each attribute uses one uniform draw in a fixed order, so two specs that differ only in one word get
    the same quantile of every range: "high contrast" is then stronger than "low contrast" for the same
    seed, and nothing else moves (a size word also moves a line's width, which follows the extent).

    Args:
        spec: The parsed instruction (words in `spec.unstated` give way to the broad distribution).
        rng: The defect's own generator.
        is_texture: Texture surfaces also get a local disturbance of their texture statistics.
        strength: The type's contrast multiplier (types.yaml).
    """
    u = rng.random(8)
    unstated = set(spec.unstated)
    size = _word_range(SIZE_RANGE, None if "size" in unstated else spec.size)
    contrast = _word_range(CONTRAST_RANGE, None if "contrast" in unstated else spec.contrast)
    soft = _word_range(SOFTNESS_RANGE, None if "softness" in unstated else spec.softness)
    ragged = _word_range(OUTLINE_RANGE, spec.outline)
    interior = _word_range(INTERIOR_RANGE, spec.interior)
    extent_frac = _log_uniform(*size, u[0])
    # Where the extent lies in the type's whole size range (0: the smallest speck, 1: the largest).
    lo, hi = _word_range(SIZE_RANGE, None)
    size_q = float(np.clip(np.log(extent_frac / lo) / np.log(hi / lo), 0.0, 1.0))
    return Look(
        extent_frac=extent_frac,
        # Bigger lines tend to be broader too (a gouge, not a longer hairline): the width's quantile leans
        # on the extent's place in the whole size range, so a large line is long and broad, a tiny one thin.
        width_frac=_log_uniform(*WIDTH_RANGE, 0.75 * size_q + 0.25 * u[1]),
        contrast=_log_uniform(*contrast, u[2]) * strength,
        surface_floor=0.0 if "contrast" in unstated else SURFACE_FLOOR.get(spec.contrast, 0.0) * strength,
        softness_frac=float(soft[0] + (soft[1] - soft[0]) * u[3]),
        ragged=float(ragged[0] + (ragged[1] - ragged[0]) * u[4]),
        interior=INTERIOR_KINDS[int(u[5] * len(INTERIOR_KINDS)) % len(INTERIOR_KINDS)],
        interior_amp=float(interior[0] + (interior[1] - interior[0]) * u[6]),
        texture_op=TEXTURE_OPS[int(u[7] * 2 * len(TEXTURE_OPS)) % (2 * len(TEXTURE_OPS))]
        if is_texture and u[7] < 0.5
        else None,
    )


@lru_cache(maxsize=1)
def _materials() -> tuple[np.ndarray, ...]:
    """Zero-mean, unit-spread detail maps of the material photographs scikit-image bundles (brick, gravel,
    grass): foreign textures that no sample surface is made of."""
    from skimage import data

    maps = []
    for name in ("brick", "gravel", "grass"):
        g = np.asarray(getattr(data, name)(), np.float32)
        g = g.mean(axis=-1) if g.ndim == 3 else g
        detail = g - ndi.gaussian_filter(g, 12.0)
        maps.append(((detail - detail.mean()) / max(float(detail.std()), 1e-6)).astype(np.float32))
    return tuple(maps)


def material_texture(shape: tuple[int, int], rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A random crop of a material detail map, turned and rescaled by `scale`, zero mean, unit std."""
    src = _materials()[int(rng.integers(0, 3))]
    h, w = shape
    zoom = float(np.clip(scale, 0.25, 4.0))
    need_h, need_w = int(np.ceil(h / zoom)) + 2, int(np.ceil(w / zoom)) + 2
    need_h, need_w = min(need_h, src.shape[0]), min(need_w, src.shape[1])
    y = int(rng.integers(0, src.shape[0] - need_h + 1))
    x = int(rng.integers(0, src.shape[1] - need_w + 1))
    crop = np.rot90(src[y : y + need_h, x : x + need_w], int(rng.integers(0, 4)))
    out = ndi.zoom(crop, (h / crop.shape[0], w / crop.shape[1]), order=1)[:h, :w]
    out = np.pad(out, ((0, h - out.shape[0]), (0, w - out.shape[1])), mode="reflect")
    std = float(out.std())
    return ((out - out.mean()) / (std if std > 1e-6 else 1.0)).astype(np.float32)


def _warp(image: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    yy, xx = coords(image.shape[:2])
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[2]):
        out[..., c] = ndi.map_coordinates(image[..., c], [yy + dy, xx + dx], order=1, mode="reflect")
    return out


def disturb_texture(image: np.ndarray, weight: np.ndarray, op: str, extent: float, rng: np.random.Generator) -> np.ndarray:
    """The surface under `weight` with its local texture statistics changed.

    * warp: the weave or grain pushed around by a fractal displacement field (a pulled thread, a kink);
    * contrast: the texture's local contrast raised or flattened about its local mean (wear, matting);
    * frequency: the texture locally rescaled (stretched or compressed pattern).

    Args:
        image: float RGB window.
        weight: (h, w) in [0, 1] where the disturbance applies.
        op: One of `TEXTURE_OPS`.
        extent: The defect's extent in pixels (sets the displacement scale).
        rng: Source of randomness.

    Returns:
        float32 RGB window.
    """
    img = np.asarray(image, np.float32)
    w = np.clip(weight, 0, 1)
    if op == "warp":
        amp = float(rng.uniform(0.6, 2.5)) + 0.05 * extent
        scale = max(2.0, extent / float(rng.uniform(3.0, 8.0)))
        dx = amp * w * fractal_noise(w.shape, scale, rng, octaves=3)
        dy = amp * w * fractal_noise(w.shape, scale, rng, octaves=3)
        return _warp(img, dx, dy)
    if op == "contrast":
        k = float(rng.choice([rng.uniform(0.2, 0.6), rng.uniform(1.5, 2.4)]))
        mean = ndi.gaussian_filter(img, (3.0, 3.0, 0))
        return mean + (img - mean) * (1.0 + (k - 1.0) * w[..., None])
    # frequency: sample the surface at a scaled coordinate around the window centre
    factor = float(rng.choice([rng.uniform(0.55, 0.8), rng.uniform(1.25, 1.8)]))
    yy, xx = coords(w.shape)
    cy, cx = (w.shape[0] - 1) / 2.0, (w.shape[1] - 1) / 2.0
    dx = (xx - cx) * (factor - 1.0) * w
    dy = (yy - cy) * (factor - 1.0) * w
    return _warp(img, dx, dy)


def interior_field(
    kind: str, before: np.ndarray, alpha: np.ndarray, extent: float, rng: np.random.Generator
) -> np.ndarray:
    """A zero-mean, unit-spread modulation field for a defect's interior (kind "fractal" or "material");
    for "displaced" the luma of the image's own content, shifted and turned, normalised the same way."""
    shape = alpha.shape
    if kind == "material":
        return material_texture(shape, rng, scale=float(rng.uniform(0.4, 1.6)))
    if kind == "displaced":
        g = luminance(before)
        g = np.rot90(g, int(rng.integers(1, 4))) if g.shape[0] == g.shape[1] else g[::-1, ::-1]
        g = np.roll(g, (int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1]))), axis=(0, 1))
        g = g - ndi.gaussian_filter(g, max(2.0, extent / 4.0))
        std = float(g.std())
        return ((g - g.mean()) / (std if std > 1e-6 else 1.0)).astype(np.float32)
    return fractal_noise(shape, max(1.5, extent / 3.0), rng, octaves=4)


def finish_stamp(
    before: np.ndarray,
    after: np.ndarray,
    alpha: np.ndarray,
    look: Look,
    *,
    family: str,
    extent: float,
    camera_sigma: float,
    surface: np.ndarray,
    thickness: float | None = None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Apply what every family shares to one rendered defect.

    Order: the interior modulation varies the change inside; a drawn change is blurred by the look's
    softness and the camera's blur; the texture disturbance (texture surfaces) joins it; last, the change
    is scaled so that its mean change where alpha ≥ 0.5 is the look's contrast (within the family's gain
    limits, and within the colours already present when it is amplified).

    Args:
        before: The low-pass window the renderer drew on (float RGB).
        after: The renderer's result on it.
        alpha: The renderer's coverage.
        look: The sampled appearance.
        family: The family that drew it (sets the gain limits and how much interior modulation applies).
        extent: The defect's extent in pixels.
        camera_sigma: Extra blur (px) that brings the rendering to the input's sharpness.
        surface: The input's window with its detail (float RGB): the surface spread a "medium" or "high"
            contrast must stand out from is measured on it.
        thickness: The scale edge softness is relative to when it is not the extent (a line's width
            times a few: a soft scratch is blurred across, not along, its length).
        rng: Source of randomness.

    Returns:
        (finished window, coverage widened by the blur, info).
    """
    change = np.asarray(after, np.float32) - before
    a = np.clip(alpha, 0, 1).astype(np.float32)
    info: dict[str, Any] = {}
    # Moved or transplanted pixels (deformation, texture, missing) already carry structure: half the depth.
    moved = family in ("deformation", "texture", "missing")
    raw = change
    amp = look.interior_amp * (0.5 if moved else 1.0)
    field = interior_field(look.interior, before, a, extent, rng)
    # Never below 60% of the envelope: the interior varies, but does not punch holes into the defect.
    change = change * np.clip(1.0 + amp * field, 0.6, 1.6)[..., None]
    # The change is brought to the camera's sharpness and the look's softness (the input's own detail is
    # added back afterwards, sharp as it was).
    sigma = float(np.hypot(look.softness_frac * (thickness or extent), camera_sigma))
    if sigma > 0.05:
        change, raw = blur_change(change, sigma), blur_change(raw, sigma)
        a = np.maximum(a, blur_change(a, sigma))
    if look.texture_op and family != "missing":
        # The surface's own texture, disturbed under the defect: its pixels keep their sharpness.
        disturbed = disturb_texture(before, a, look.texture_op, extent, rng)
        change = change + (disturbed - before) * a[..., None]
        info["texture_op"] = look.texture_op
    inside = a >= 0.5
    # Max-channel change: a hue shift of a named colour counts as much as a brightness change.
    strength = float(np.abs(change).max(axis=-1)[inside].mean()) if inside.any() else 0.0
    lo, hi = GAIN_LIMITS.get(family, (0.1, 4.0))
    target = max(look.contrast, look.surface_floor * texture_contrast(surface, a)) if look.surface_floor else look.contrast
    gain = float(np.clip(target / max(strength, 1e-3), lo, hi)) if strength > 1e-3 else 1.0
    if gain > 1.0:
        # Amplify within the colours already there (the surface's and the rendering's own, with a little
        # room), with one factor for all channels of a pixel: scaling a hue shift up must neither run off
        # into a saturated primary nor turn into another hue.
        flat_b, flat_a = before.reshape(-1, 3), np.asarray(after, np.float32).reshape(-1, 3)
        lo = np.minimum(flat_b.min(axis=0), flat_a.min(axis=0)) - 25.0
        hi = np.maximum(flat_b.max(axis=0), flat_a.max(axis=0)) + 25.0
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(change > 1e-6, (hi - before) / change, np.where(change < -1e-6, (lo - before) / change, np.inf))
        out = before + change * np.clip(np.minimum(gain, room.min(axis=-1)), 0.0, None)[..., None]
    else:
        out = before + change * gain
    if moved:
        # Where the rendering replaced one colour by another (a transplant, a background showing), scaling
        # would push the blend past its end point into the complementary hue: those pixels stay between
        # the surface and the rendering. Re-shaded pixels (the change parallel to the colour) may scale.
        dot = (raw * before).sum(-1)
        norm = np.linalg.norm(raw, axis=-1) * np.linalg.norm(before, axis=-1) + 1e-6
        blend = (np.abs(dot) / norm < 0.98)[..., None]
        ends = before + raw
        out = np.where(blend, np.clip(out, np.minimum(before, ends) - 2.0, np.maximum(before, ends) + 2.0), out)
    out = np.clip(out, 0, 255).astype(np.float32)
    info.update({"blur_sigma_px": round(sigma, 2), "contrast_target": round(target, 2), "contrast_gain": round(gain, 3)})
    return out, a, info


__all__ = [
    "Look",
    "sample_look",
    "finish_stamp",
    "disturb_texture",
    "material_texture",
    "interior_field",
]

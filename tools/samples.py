"""Normal sample images, built at run time from pictures bundled with scikit-image.

Why: tests, demos and the CLI need a few MVTec-like normal images without downloading anything, and
the MVTec-AD licence does not let us ship its images. `skimage.data` bundles a handful of real
photographs (gravel, grass, coins) that load without a network; we crop, tint and compose them into
texture categories (whole frame is product) and object categories (one product on a plain background,
dark or light, like MVTec's metal_nut and capsule). Everything is seeded, so the same call always writes
the same files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import data, filters, measure, morphology, transform

logger = logging.getLogger(__name__)

#: Category name -> "texture" or "object". Names are MVTec-AD categories.
SAMPLE_CATEGORIES: dict[str, str] = {
    "tile": "texture",
    "carpet": "texture",
    "wood": "texture",
    "metal_nut": "object",
    "capsule": "object",
}


def _resize(gray_or_rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize a float image to (size, size), anti-aliased, same channel layout."""
    return transform.resize(gray_or_rgb, (size, size), order=3, anti_aliasing=True, mode="reflect").astype(
        np.float32
    )


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _random_crop(gray: np.ndarray, rng: np.random.Generator, lo: float = 0.5, hi: float = 0.8) -> np.ndarray:
    """A random square crop covering `lo`..`hi` of the shorter side, randomly flipped/rotated by 90°."""
    h, w = gray.shape[:2]
    side = int(min(h, w) * rng.uniform(lo, hi))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = gray[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.rot90(crop, int(rng.integers(0, 4))).copy()


def _tint(gray01: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map a [0, 1] grey image onto a colour ramp from `dark` to `light` RGB (0..255)."""
    g = np.clip(gray01, 0, 1)[..., None]
    return dark[None, None, :] * (1 - g) + light[None, None, :] * g


def make_tile(size: int, rng: np.random.Generator) -> np.ndarray:
    """Terrazzo-like tile from the bundled gravel photograph, tinted to a ceramic grey/beige."""
    g = _random_crop(data.gravel().astype(np.float32) / 255.0, rng, 0.35, 0.6)
    g = _resize(g, size)
    g = 0.35 + 0.65 * (g - g.min()) / max(float(np.ptp(g)), 1e-6)
    base = np.array(rng.choice([[150, 148, 140], [165, 155, 138], [140, 142, 146]]), dtype=np.float32)
    img = _tint(g, base * 0.45, np.minimum(base * 1.35, 250))
    return _to_uint8(img)


def make_carpet(size: int, rng: np.random.Generator) -> np.ndarray:
    """Woven-looking carpet from the bundled grass photograph, softened and tinted to a fabric colour."""
    g = _random_crop(data.grass().astype(np.float32) / 255.0, rng, 0.35, 0.55)
    g = _resize(g, size)
    g = filters.gaussian(g, sigma=0.6)
    g = (g - g.mean()) / max(float(g.std()), 1e-6)
    g = np.clip(0.55 + 0.17 * g, 0, 1)
    palettes = [
        ([70, 60, 50], [200, 180, 150]),
        ([55, 60, 75], [170, 175, 190]),
        ([80, 55, 45], [205, 160, 130]),
    ]
    dark, light = palettes[int(rng.integers(0, len(palettes)))]
    return _to_uint8(_tint(g, np.array(dark, np.float32), np.array(light, np.float32)))


def make_wood(size: int, rng: np.random.Generator) -> np.ndarray:
    """Procedural wood: growth rings warped by smooth noise plus fine fibre streaks along the grain."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    warp = filters.gaussian(rng.normal(size=(size, size)), sigma=size / 10)
    warp = warp / max(float(np.abs(warp).max()), 1e-6)
    freq = rng.uniform(7, 12)
    rings = np.sin(
        2 * np.pi * (freq * xx + 0.6 * warp + 0.15 * np.sin(2 * np.pi * yy * rng.uniform(0.5, 1.5)))
    )
    rings = 0.5 + 0.5 * rings**3
    fibres = filters.gaussian(rng.normal(size=(size, size)), sigma=(size / 16, 0.6))
    fibres = fibres / max(float(fibres.std()), 1e-6)
    g = np.clip(0.55 * rings + 0.25 + 0.06 * fibres, 0, 1)
    if rng.random() < 0.5:
        g = g.T
    dark = np.array(rng.choice([[120, 78, 45], [105, 70, 48], [135, 95, 60]]), np.float32)
    light = np.array([205, 160, 110], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
    return _to_uint8(_tint(g, dark, light))


@lru_cache(maxsize=1)
def _coin_masks() -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """Segment the round coins of `skimage.data.coins` (white top-hat, Otsu, fill); cached."""
    coins = data.coins().astype(np.float32)
    tophat = coins - ndi.grey_opening(coins, size=(41, 41))
    mask = tophat > filters.threshold_otsu(tophat)
    mask = ndi.binary_fill_holes(ndi.binary_closing(mask, morphology.disk(2)))
    mask = ndi.binary_opening(mask, morphology.disk(3))
    labels = measure.label(mask)
    boxes = [
        r.slice
        for r in measure.regionprops(labels)
        if r.area > 1400 and r.eccentricity < 0.45 and min(r.bbox[0], r.bbox[1]) > 3
    ]
    return labels > 0, boxes


def make_metal_nut(size: int, rng: np.random.Generator, index: int = 0) -> np.ndarray:
    """A metallic coin from `skimage.data.coins` on a dark, slightly uneven background (like metal_nut)."""
    coins = data.coins().astype(np.float32)
    mask, boxes = _coin_masks()
    sl = boxes[(index * 3 + int(rng.integers(0, 3))) % len(boxes)]
    pad = 4
    ys = slice(max(0, sl[0].start - pad), sl[0].stop + pad)
    xs = slice(max(0, sl[1].start - pad), sl[1].stop + pad)
    crop, cmask = coins[ys, xs], mask[ys, xs].astype(np.float32)
    k = int(rng.integers(0, 4))
    crop, cmask = np.rot90(crop, k), np.rot90(cmask, k)
    side = int(size * rng.uniform(0.74, 0.86))
    crop = transform.resize(crop, (side, side), order=3, anti_aliasing=True)
    cmask = filters.gaussian(transform.resize(cmask, (side, side), order=1), sigma=side / 150)
    alpha = np.clip((cmask - 0.5) * 4 + 0.5, 0, 1)
    crop = (crop - crop.min()) / max(float(np.ptp(crop)), 1e-6)
    # Unsharp mask restores some of the detail the upscaling blurred.
    crop = np.clip(crop + 0.6 * (crop - filters.gaussian(crop, sigma=1.2)), 0, 1)
    tint_dark = np.array([55, 55, 60], np.float32) + rng.uniform(-5, 5)
    tint_light = (
        np.array([215, 210, 200], np.float32)
        + rng.uniform(-12, 12)
        + rng.uniform(-3, 3, 3).astype(np.float32)
    )
    obj = _tint(0.15 + 0.85 * crop, tint_dark, tint_light)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    bg_level = rng.uniform(18, 32)
    bg = bg_level * (1.0 + 0.25 * (xx - 0.5) - 0.2 * (yy - 0.5))
    bg = bg[..., None] * np.array([1.0, 1.0, 1.08], np.float32) + rng.normal(0, 1.2, (size, size, 3))
    out = bg.astype(np.float32)
    cy = int((size - side) / 2 + rng.integers(-size // 40, size // 40 + 1))
    cx = int((size - side) / 2 + rng.integers(-size // 40, size // 40 + 1))
    region = out[cy : cy + side, cx : cx + side]
    a = alpha[..., None]
    out[cy : cy + side, cx : cx + side] = region * (1 - a) + obj * a
    return _to_uint8(out)


def make_capsule(size: int, rng: np.random.Generator) -> np.ndarray:
    """A two-tone capsule drawn with cylindrical shading and a soft shadow on a light background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(-0.2, 0.2) + (np.pi / 2 if rng.random() < 0.25 else 0.0)
    cx = size / 2 + rng.uniform(-0.04, 0.04) * size
    cy = size / 2 + rng.uniform(-0.04, 0.04) * size
    half_len = size * rng.uniform(0.36, 0.41)
    radius = size * rng.uniform(0.13, 0.16)
    ca, sa = np.cos(angle), np.sin(angle)
    u = (xx - cx) * ca + (yy - cy) * sa  # along the capsule
    v = -(xx - cx) * sa + (yy - cy) * ca  # across
    core = half_len - radius
    du = np.maximum(np.abs(u) - core, 0)
    dist = np.sqrt(du**2 + v**2) - radius  # signed distance to the stadium outline
    alpha = np.clip(0.5 - dist, 0, 1)
    pairs = [
        ([35, 35, 38], [220, 120, 40]),
        ([235, 232, 225], [190, 40, 40]),
        ([60, 90, 170], [230, 200, 70]),
        ([40, 120, 70], [235, 235, 228]),
    ]
    c1, c2 = (np.array(c, np.float32) for c in pairs[int(rng.integers(0, len(pairs)))])
    split = rng.uniform(-0.1, 0.1) * half_len
    side = np.clip((u - split) * 0.8 + 0.5, 0, 1)[..., None]
    body = c1 * (1 - side) + c2 * side
    # Cylinder shading across the width, a specular stripe, and fine surface noise.
    n = np.clip(np.abs(v) / radius, 0, 1)
    shade = 0.55 + 0.45 * np.sqrt(np.clip(1 - n**2, 0, 1))
    spec = 70 * np.exp(-(((v + 0.45 * radius) / (0.12 * radius)) ** 2))
    body = body * shade[..., None] + spec[..., None] + rng.normal(0, 1.5, (size, size, 3))
    bg_level = rng.uniform(185, 215)
    bg = np.full((size, size, 3), bg_level, np.float32) * np.array([1.0, 1.0, 0.98], np.float32)
    bg = bg * (1 - 0.05 * ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size / 2) ** 2)[..., None]
    shadow = filters.gaussian(np.clip(0.5 - (dist - 0.02 * size), 0, 1), sigma=size / 60)
    shadow = np.roll(shadow, (int(size * 0.015), int(size * 0.015)), axis=(0, 1))
    bg = bg * (1 - 0.22 * shadow[..., None]) + rng.normal(0, 1.0, (size, size, 3))
    out = bg * (1 - alpha[..., None]) + body * alpha[..., None]
    return _to_uint8(out)


_MAKERS: dict[str, Callable[[int, np.random.Generator, int], np.ndarray]] = {
    "tile": lambda s, r, i: make_tile(s, r),
    "carpet": lambda s, r, i: make_carpet(s, r),
    "wood": lambda s, r, i: make_wood(s, r),
    "metal_nut": make_metal_nut,
    "capsule": lambda s, r, i: make_capsule(s, r),
}


def sample_image(category: str, index: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """Build one normal image in memory.

    Args:
        category: A key of `SAMPLE_CATEGORIES`.
        index: Which variant (crops, flips, tints and positions differ per index).
        size: Output side in pixels.
        seed: Base seed; the image is a pure function of (category, index, size, seed).

    Returns:
        uint8 RGB (size, size, 3).
    """
    if category not in _MAKERS:
        raise ValueError(f"unknown sample category {category!r}; choose one of {sorted(_MAKERS)}")
    if size < 32:
        raise ValueError(f"size must be at least 32 px, got {size}")
    cat_id = sorted(_MAKERS).index(category)
    rng = np.random.default_rng([seed, cat_id, index])
    img = _MAKERS[category](size, rng, index)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    return img


def make_samples(out_dir: Path, size: int = 256, per_category: int = 4, seed: int = 0) -> list[dict]:
    """Write normal sample images as `out_dir/<category>/NNN.png`.

    Args:
        out_dir: Root folder; created if missing. Existing files with the same names are overwritten.
        size: Side of the square images in pixels.
        per_category: Images per category (variants differ by crop, flip, tint and placement).
        seed: Base seed, so runs are reproducible.

    Returns:
        One dict per image: {"path": str, "category": str, "kind": "texture" | "object"}.
    """
    out_dir = Path(out_dir)
    records: list[dict] = []
    for category, kind in SAMPLE_CATEGORIES.items():
        folder = out_dir / category
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            path = folder / f"{i:03d}.png"
            Image.fromarray(sample_image(category, i, size, seed), mode="RGB").save(path)
            records.append({"path": str(path), "category": category, "kind": kind})
    logger.info("wrote %d sample images under %s", len(records), out_dir)
    return records

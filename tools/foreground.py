"""Where the product is: a foreground mask for an image of an object or a texture.

Why: IG must put defects on the product, never on the table it lies on, and QE checks the same thing.
MVTec-like images show either a texture that fills the frame (carpet, wood, tile: everything is
foreground) or one object on a fairly plain background (bottle, screw, metal_nut). For objects we
model the background from the image border, where the object rarely is, and call foreground every
pixel that is far from that model. The model is a smooth (quadratic) colour field in Lab, so uneven
lighting and vignetting do not read as foreground, and it is fitted robustly, so an object that
touches the border does not pull the model towards itself.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, morphology

logger = logging.getLogger(__name__)

#: Foreground estimates covering less or more than these fractions of the image are not trusted.
MIN_FRACTION = 0.03
MAX_FRACTION = 0.97


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            "expected a uint8 RGB image of shape (H, W, 3); convert it first "
            f"(got {getattr(image, 'dtype', type(image))} with shape {getattr(image, 'shape', None)})"
        )


def texture_foreground(shape: tuple[int, int], border: float = 0.02) -> np.ndarray:
    """All of a texture image, minus a thin border.

    Args:
        shape: (H, W) of the image.
        border: Border width as a fraction of the shorter side; defects placed flush against the frame
            look cut off, so the outermost pixels are excluded.

    Returns:
        Bool mask (H, W).
    """
    h, w = shape
    b = max(1, int(round(border * min(h, w))))
    mask = np.zeros((h, w), dtype=bool)
    mask[b : h - b, b : w - b] = True
    return mask


def centred_ellipse(shape: tuple[int, int], fraction: float = 0.6) -> np.ndarray:
    """A centred ellipse spanning `fraction` of each side: the fallback when estimation fails.

    Args:
        shape: (H, W) of the image.
        fraction: Ellipse diameter relative to the image side. Objects in inspection images are
            usually centred and fill about half to two thirds of the frame.

    Returns:
        Bool mask (H, W).
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    ry, rx = max(1.0, fraction * h / 2.0), max(1.0, fraction * w / 2.0)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _design(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Quadratic polynomial basis in normalised coordinates, one row per pixel."""
    return np.stack([np.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], axis=-1)


def background_distance(
    image: np.ndarray, border: float = 0.04, shadow_weight: float = 0.5, sigma: float | None = None
) -> tuple[np.ndarray, float]:
    """Per-pixel colour distance (CIE ΔE) to a smooth background model fitted on the image border.

    Args:
        image: uint8 RGB (H, W, 3).
        border: Width of the border band used to fit the model, as a fraction of the shorter side.
        shadow_weight: Weight of lightness *decreases* relative to the background. Cast shadows are the
            background made darker with its hue kept; counting darkening at half weight keeps an
            object's soft shadow from being taken for the object.
        sigma: Gaussian smoothing of the colour difference before its norm is taken (default: about
            1/200 of the shorter side, at least 1 px). Smoothing the signed difference, not the norm,
            averages sensor noise away, so low-contrast objects stand out.

    Returns:
        (distance map (H, W) float32, noise level of that map on the background border). The noise
        level tells the caller how far a pixel must be from the model before it counts.
    """
    _check_image(image)
    h, w = image.shape[:2]
    lab = color.rgb2lab(image).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy = yy / max(h - 1, 1) * 2 - 1
    xx = xx / max(w - 1, 1) * 2 - 1
    b = max(2, int(round(border * min(h, w))))
    band = np.zeros((h, w), dtype=bool)
    band[:b, :] = band[-b:, :] = band[:, :b] = band[:, -b:] = True
    # Subsample the band: a few thousand pixels fix six coefficients per channel well enough.
    idx = np.flatnonzero(band.ravel())
    if idx.size > 6000:
        idx = idx[:: idx.size // 6000 + 1]
    A = _design(yy.ravel()[idx], xx.ravel()[idx])
    y = lab.reshape(-1, 3)[idx]

    def inliers(resid: np.ndarray, ref: np.ndarray) -> np.ndarray:
        med = float(np.median(ref))
        mad = 1.4826 * float(np.median(np.abs(ref - med)))
        return resid <= med + 3.0 * mad + 1.0

    # Start from the median colour (robust to an object covering part of the border), then refine the
    # quadratic fit on the pixels that agree with it.
    resid = np.linalg.norm(y - np.median(y, axis=0), axis=1)
    keep = inliers(resid, resid)
    coef = np.zeros((6, 3), dtype=np.float32)
    for _ in range(4):
        if keep.sum() < 12:
            break
        coef, *_ = np.linalg.lstsq(A[keep], y[keep], rcond=None)
        resid = np.linalg.norm(y - A @ coef, axis=1)
        new_keep = inliers(resid, resid[keep])
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    delta = lab - _design(yy, xx) @ coef
    delta[..., 0] = np.where(delta[..., 0] < 0, shadow_weight * delta[..., 0], delta[..., 0])
    s = max(1.0, min(h, w) / 200.0) if sigma is None else sigma
    delta = ndi.gaussian_filter(delta, (s, s, 0))
    dist = np.sqrt((delta**2).sum(axis=-1)).astype(np.float32)
    # Noise level: the distance on border pixels that the robust fit accepted as background.
    border_d = dist.reshape(-1)[idx][keep] if keep.any() else dist[band]
    med = float(np.median(border_d))
    noise = med + 1.4826 * float(np.median(np.abs(border_d - med)))
    return dist, max(noise, 0.3)


def _keep_large_components(mask: np.ndarray, relative: float = 0.25) -> np.ndarray:
    """Keep the largest component and any other at least `relative` times its area."""
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    areas = ndi.sum(mask, labels, index=np.arange(1, n + 1))
    keep_ids = np.flatnonzero(areas >= relative * areas.max()) + 1
    return np.isin(labels, keep_ids)


def estimate_foreground(image: np.ndarray, is_texture: bool) -> np.ndarray:
    """Estimate the product's pixels in an inspection image.

    Args:
        image: uint8 RGB (H, W, 3).
        is_texture: True for texture categories (carpet, wood, ...), whose whole frame is product.

    Returns:
        Bool mask (H, W), True on the product. For objects, when the estimate covers less than 3% or
        more than 97% of the image (no usable contrast with the background), a centred ellipse is
        returned instead and a warning is logged, so callers always get a plausible area.
    """
    _check_image(image)
    h, w = image.shape[:2]
    if is_texture:
        return texture_foreground((h, w))
    dist, noise = background_distance(image)
    # Otsu on log-distance: background sits at noise level while objects spread over a wide range of
    # distances (a two-tone capsule); the log scale keeps Otsu between the two instead of inside the object.
    floor = max(2.5 * noise, 2.0)
    logd = np.log1p(dist)
    t = float(np.expm1(filters.threshold_otsu(logd))) if np.ptp(logd) > 0 else floor
    mask = dist > max(t, floor)
    r = max(1, int(round(min(h, w) / 128.0)))
    mask = ndi.binary_opening(mask, morphology.disk(r))
    mask = ndi.binary_closing(mask, morphology.disk(2 * r), border_value=0)
    mask = ndi.binary_fill_holes(mask)
    mask = _keep_large_components(mask)
    frac = float(mask.mean())
    if not (MIN_FRACTION <= frac <= MAX_FRACTION):
        logger.warning(
            "foreground estimate covers %.1f%% of the image (outside %.0f%%..%.0f%%); "
            "using a centred ellipse instead. Pass is_texture=True for texture categories.",
            100 * frac,
            100 * MIN_FRACTION,
            100 * MAX_FRACTION,
        )
        return centred_ellipse((h, w))
    return mask


def foreground_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of a mask, x1/y1 exclusive; the whole frame when the mask is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return 0, 0, mask.shape[1], mask.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def foreground_diameter(mask: np.ndarray) -> float:
    """Equivalent diameter of a mask (the diameter of a disc with the same area), at least 8 px.

    Why: defect sizes are fractions of the product's size, and the equivalent diameter is stable for
    round, long and full-frame products alike.
    """
    return max(8.0, float(2.0 * np.sqrt(mask.sum() / np.pi)))


__all__ = [
    "estimate_foreground",
    "background_distance",
    "texture_foreground",
    "centred_ellipse",
    "foreground_box",
    "foreground_diameter",
]

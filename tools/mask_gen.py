"""MG's embedded backend: the defect mask from the difference between the normal and the edited image.

Why a difference mask: every IG backend edits a copy of the normal image, so what changed *is* the
defect. The catch is deciding how much change counts. Unchanged pixels are not always identical (JPEG
or VAE re-encoding adds a few levels everywhere), and a defect with a soft edge fades out gradually.
We estimate the noise floor from the difference image itself (median + k·MAD, never below a few
levels), and inside each changed blob keep the pixels that reach half of that blob's typical change:
the half-maximum convention, the same one by which the procedural engine's coverage crosses 0.5 on a
defect's outline. Otsu on the changed values supplies the threshold instead when it is lower (a faint
defect next to a strong one). Morphology then closes pinholes and fills enclosed holes, and tiny
specks are dropped by area (not by opening, which would erase thin scratches).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters

from tools.types import MaskResult

logger = logging.getLogger(__name__)

#: Noise floor (levels) when the edited image is bit-identical to the normal one outside the change.
EXACT_LEVEL = 1.5
#: Mean change (levels, max over channels) inside a known region below which it is not trusted as the
#: mask (the edit did not happen there, e.g. a region passed for another image).
KNOWN_REGION_MIN_CHANGE = 1.0


def _check_pair(normal: np.ndarray, edited: np.ndarray) -> None:
    for name, img in (("normal", normal), ("edited", edited)):
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(
                f"{name} must be an RGB array of shape (H, W, 3); got shape {getattr(img, 'shape', None)}"
            )
    if normal.shape != edited.shape:
        raise ValueError(
            f"normal {normal.shape} and edited {edited.shape} images differ in size; "
            "resize the edited image to the normal one before asking for a change mask"
        )


def difference_map(normal: np.ndarray, edited: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    """Per-pixel change: max over RGB channels of the absolute difference, lightly smoothed.

    Args:
        normal: RGB image (H, W, 3), any numeric dtype on a 0..255 scale.
        edited: Same shape.
        sigma: Gaussian smoothing in pixels; joins texture-modulated changes into one region without
            widening thin lines by more than a pixel.

    Returns:
        float32 (H, W) in levels.
    """
    diff = np.abs(np.asarray(edited, np.float32) - np.asarray(normal, np.float32)).max(axis=-1)
    return ndi.gaussian_filter(diff, sigma) if sigma > 0 else diff


def noise_floor(diff: np.ndarray, minimum: float = 6.0, k: float = 5.0) -> float:
    """Level below which a change is treated as noise: max(minimum, median + k·1.4826·MAD), or
    `EXACT_LEVEL` when the image is bit-identical outside the change (median and MAD both under half a
    level: an editor that touched only the defect, like the procedural engine).

    Why the exact case: re-encoding backends move every pixel by a few levels, hence the absolute floor;
    an editor that leaves the rest of the image untouched has no noise to guard against, and a faint
    defect of a few levels is then still a real change.

    Args:
        diff: Difference map.
        minimum: Absolute floor in levels; JPEG at quality ~90 moves pixels by about this much.
        k: Noise multiplier; large because defects are a small part of the image.
    """
    med = float(np.median(diff))
    mad = float(np.median(np.abs(diff - med)))
    if med + k * 1.4826 * mad < 0.5:
        return EXACT_LEVEL
    return max(minimum, med + k * 1.4826 * mad)


def _label_percentile(values: np.ndarray, labels: np.ndarray, n: int, q: float) -> np.ndarray:
    """The q-th percentile (nearest rank) of `values` within each label 1..n; 0 for empty labels."""
    lab = labels.ravel()
    keep = lab > 0
    lab, val = lab[keep], values.ravel()[keep]
    out = np.zeros(n, np.float64)
    if lab.size == 0:
        return out
    order = np.lexsort((val, lab))
    lab, val = lab[order], val[order]
    starts = np.searchsorted(lab, np.arange(1, n + 1), side="left")
    ends = np.searchsorted(lab, np.arange(1, n + 1), side="right")
    counts = ends - starts
    present = counts > 0
    idx = starts[present] + np.round((counts[present] - 1) * q / 100.0).astype(int)
    out[present] = val[idx]
    return out


def change_mask(
    normal: np.ndarray,
    edited: np.ndarray,
    *,
    min_area_fraction: float = 0.0001,
    min_level: float = 6.0,
    relative: float = 0.5,
    percentile: float = 75.0,
    sigma: float = 0.5,
    close_radius: int = 1,
    use_otsu: bool = False,
    core_fraction: float = 0.5,
) -> MaskResult:
    """The mask of what changed between a normal image and its edited copy.

    Args:
        normal: uint8 RGB (H, W, 3).
        edited: uint8 RGB, same shape.
        min_area_fraction: Components smaller than this fraction of the image (and than 4 px) are
            dropped as specks.
        min_level: Absolute noise floor in levels (see `noise_floor`).
        relative: Within each changed blob, keep pixels reaching this fraction of the blob's typical
            (75th percentile) change; 0.5 is the half-maximum extent.
        sigma: Smoothing of the difference map.
        close_radius: Radius of the closing that bridges 1-px gaps; 0 disables it.

    Returns:
        `MaskResult` with a bool mask, its bounding box (x0, y0, x1, y1), x1/y1 exclusive, or None when
        nothing changed, and info: floor, thresholds, number of components, area fraction.

    Raises:
        ValueError: When the images are not RGB or differ in shape.
    """
    _check_pair(normal, edited)
    h, w = normal.shape[:2]
    diff = difference_map(normal, edited, sigma)
    floor = noise_floor(diff, minimum=min_level)
    seed_full = diff > floor
    info: dict = {"floor": round(floor, 2), "max_change": round(float(diff.max()), 2)}
    mask = np.zeros((h, w), bool)
    if seed_full.any():
        # Work inside the seeds' bounding box (plus room for the closing): the rest stays empty.
        ys, xs = np.nonzero(seed_full)
        pad = close_radius + 2
        y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + pad + 1)
        x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + pad + 1)
        d, seed = diff[y0:y1, x0:x1], seed_full[y0:y1, x0:x1]
        values = d[seed]
        otsu = float(filters.threshold_otsu(values)) if values.size > 8 and np.ptp(values) > 0 else floor
        labels, n = ndi.label(seed, structure=np.ones((3, 3)))
        # Each blob's typical change: the `percentile` of its substantial values (those above
        # `core_fraction` of its near-maximum), so faint halos around a strong defect do not drag it down.
        peak = _label_percentile(d, labels, n, 95.0)
        core = d >= np.concatenate([[np.inf], core_fraction * peak])[labels]
        typical = _label_percentile(d, np.where(core, labels, 0), n, percentile)
        thresh_per_label = np.maximum(floor, relative * typical)
        if use_otsu:
            thresh_per_label = np.maximum(floor, np.minimum(thresh_per_label, otsu))
        sub = d >= np.concatenate([[np.inf], thresh_per_label])[labels]
        info.update({"otsu": round(otsu, 2), "blobs": int(n)})
        if close_radius > 0:
            st = ndi.generate_binary_structure(2, 1)
            sub = ndi.binary_closing(sub, st, iterations=close_radius, border_value=0)
        sub = ndi.binary_fill_holes(sub)
        # Specks are dropped as re-encoding noise; an exact edit has none, so there only single pixels go.
        min_area = 2 if floor <= EXACT_LEVEL else max(4, int(round(min_area_fraction * h * w)))
        labels, n = ndi.label(sub, structure=np.ones((3, 3)))
        if n:
            areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            sub = np.concatenate([[False], areas >= min_area])[labels]
            info["components"] = int((areas >= min_area).sum())
        mask[y0:y1, x0:x1] = sub
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if ys.size else None
    info["area_fraction"] = round(float(mask.mean()), 5)
    if box is None:
        logger.info("change mask is empty: nothing changed above %.1f levels", floor)
    return MaskResult(mask=mask, box=box, info=info)


@dataclass
class ChangeMaskGenerator:
    """`MaskGenerator` backend over `change_mask`, with its parameters as configuration.

    Attributes:
        min_area_fraction: Specks below this fraction of the image are dropped.
        min_level: Absolute noise floor in levels.
        relative: Half-maximum fraction per changed blob.
        sigma: Difference smoothing in pixels.
        close_radius: Closing radius bridging 1-px gaps.
    """

    min_area_fraction: float = 0.0001
    min_level: float = 6.0
    relative: float = 0.5
    sigma: float = 0.5
    close_radius: int = 1

    def generate(
        self, normal: np.ndarray, edited: np.ndarray, known_region: np.ndarray | None = None
    ) -> MaskResult:
        """The defect mask of `edited` against `normal`.

        Contract: when the image backend knows the region it changed (the procedural engine does; the
        graph passes it from the generation's stored `region_id`), that region is the mask, provided the
        edit really changed it (the pixels inside differ from the normal image by at least
        `KNOWN_REGION_MIN_CHANGE` levels on average); otherwise, and for backends that do not know their
        region (inpainters, edit endpoints), the mask is the colour-difference change mask
        (`change_mask`). Why: a faint defect that carries the image's own noise and JPEG blocking is
        exactly what a detector should learn from, and exactly what a difference threshold cannot cut
        out; the engine's region is exact by construction. `info["source"]` says which one was used.
        """
        if known_region is not None:
            region = np.asarray(known_region, bool)
            _check_pair(normal, edited)
            if region.shape == normal.shape[:2] and region.any():
                change = float(difference_map(normal, edited, 0.0)[region].mean())
                if change >= KNOWN_REGION_MIN_CHANGE:
                    ys, xs = np.nonzero(region)
                    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
                    return MaskResult(
                        mask=region.copy(),
                        box=box,
                        info={"source": "engine_region", "mean_change": round(change, 2),
                              "area_fraction": round(float(region.mean()), 5)},
                    )
        result = change_mask(
            normal,
            edited,
            min_area_fraction=self.min_area_fraction,
            min_level=self.min_level,
            relative=self.relative,
            sigma=self.sigma,
            close_radius=self.close_radius,
        )
        result.info["source"] = "change_mask"
        return result

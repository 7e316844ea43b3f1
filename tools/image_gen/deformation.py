"""Deformation defects: bent, squeeze, fold, misplaced, flip — the product's own pixels, moved.

Why a warp: a deformed product shows its own texture displaced, not new paint. We build a smooth
displacement field that is strongest at the defect's centre and vanishes towards its edge and towards
the product's outline (so the silhouette and the background stay put), resample the image through it,
and shade the change from a height field consistent with the displacement (a bent or squeezed area
is a shallow dip or bulge; a fold is a crease with a lit and a shaded side).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools.image_gen.blending import CONTRAST_DELTA, Stamp, change_luminance, luminance
from tools.image_gen.hole import apply_shading, shade_from_height
from tools.image_gen.placement import Canvas, sample_centre
from tools.image_gen.shapes import blob_field, coords, edge_alpha
from tools.vocabulary import DefectSpec

#: Displacement amplitude relative to the radius, per contrast word.
_AMPLITUDE = {"low": 0.16, "medium": 0.24, "high": 0.34}


def warp(image: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Resample `image` so that pixel p shows what was at p + (dx, dy) (bilinear, edges clamped)."""
    yy, xx = coords(image.shape[:2])
    cy, cx = yy + dy, xx + dx
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[2]):
        out[..., c] = ndi.map_coordinates(image[..., c], [cy, cx], order=1, mode="nearest")
    return out


def render_deformation(canvas: Canvas, spec: DefectSpec, rng: np.random.Generator) -> Stamp:
    """Deform a patch of the product.

    Args:
        canvas: Where it may go, with the request's light direction.
        spec: Shape (bent / squeeze / fold / misplaced / flip), size, contrast (displacement), softness.
        rng: Source of randomness.

    Returns:
        A `Stamp`; alpha ≥ 0.5 where the surface moved by at least half a pixel (warps), or inside the
        seam of a shifted/mirrored piece.
    """
    shape = spec.shape if spec.shape in ("bent", "squeeze", "fold", "misplaced", "flip") else "bent"
    radius = max(4.0, canvas.extent(spec.size, rng) / 2.0 * 1.2)
    full_centre = sample_centre(canvas, radius, rng)
    box = canvas.around(full_centre, 1.7 * radius + 4)
    sub = canvas.crop(box)
    cx, cy = full_centre[0] - sub.origin[0], full_centre[1] - sub.origin[1]
    yy, xx = coords(sub.shape)
    px, py = xx - cx, yy - cy
    amp = _AMPLITUDE[spec.contrast] * radius
    theta = float(rng.uniform(0, 2 * np.pi))
    ex, ey = np.cos(theta), np.sin(theta)
    # Vanish towards the product's outline so the silhouette does not move.
    keep = np.clip(sub.depth / (0.15 * radius + 2.0), 0, 1)
    outline = blob_field(
        sub.shape,
        (cx, cy),
        radius,
        rng,
        irregularity=0.12,
        harmonics=4,
        aspect=float(rng.uniform(0.7, 1.0)),
        angle=theta,
    )
    soft = max(1.0, 0.3 * radius) if spec.softness == "soft" else max(1.0, 0.18 * radius)
    bump = edge_alpha(outline, soft) * keep  # 1 inside, smooth falloff at the outline
    img = sub.image
    info: dict[str, Any] = {
        "kind": shape,
        "centre": [round(full_centre[0], 1), round(full_centre[1], 1)],
        "radius_px": round(radius, 1),
        "amplitude_px": round(amp, 1),
        "direction_deg": round(float(np.rad2deg(theta)) % 360, 1),
        "contrast": spec.contrast,
    }
    delta = CONTRAST_DELTA[spec.contrast]
    if shape in ("misplaced", "flip"):
        # A piece of the product sits shifted or mirrored: its own pixels, moved as a block, with a seam.
        if shape == "misplaced":
            dx = np.full(sub.shape, amp * ex, np.float32)
            dy = np.full(sub.shape, amp * ey, np.float32)
        else:
            u = px * ex + py * ey
            dx, dy = -2 * u * ex, -2 * u * ey
        moved = warp(img, dx.astype(np.float32), dy.astype(np.float32))
        seam = (
            edge_alpha(outline, 0.6 if spec.softness == "sharp" else max(1.0, 0.08 * radius))
            * keep
            * sub.fg_soft
        )
        out = img + (moved - img) * seam[..., None]
        # The seam is a slight gap: a thin dark line where the moved piece meets the rest.
        ring = np.exp(-((outline / max(0.7, 0.03 * radius)) ** 2)) * keep * sub.fg_soft
        out = change_luminance(out, ring, -0.5 * delta)
        alpha = np.maximum(seam, ring * 0.6)
        return Stamp(
            image=np.clip(out, 0, 255).astype(np.float32), alpha=alpha.astype(np.float32), box=box, info=info
        )
    prof = bump * np.exp(-(px**2 + py**2) / (2 * (0.6 * radius) ** 2))
    if shape == "bent":
        dx, dy = amp * ex * prof, amp * ey * prof
        height = -0.6 * amp * prof
    elif shape == "squeeze":
        dx, dy = 0.8 * _AMPLITUDE[spec.contrast] * px * prof, 0.8 * _AMPLITUDE[spec.contrast] * py * prof
        height = -0.7 * amp * prof
    else:  # fold
        nx, ny = -ey, ex
        u = px * nx + py * ny
        step = 1.0 / (1.0 + np.exp(-u / max(0.6, 0.06 * radius)))
        dx, dy = amp * nx * step * bump, amp * ny * step * bump
        height = -0.9 * amp * np.exp(-((u / max(0.8, 0.1 * radius)) ** 2)) * bump
    moved = warp(img, dx, dy)
    ratio = shade_from_height(ndi.gaussian_filter(height, 0.8), sub.light)
    # A deformed area also sits a little darker (it catches less diffuse light), which keeps it
    # visible on plain surfaces.
    occl = 1.0 - 0.12 * (0.5 + 0.5 * min(1.0, amp / 6.0)) * (-height / max(float(-height.min()), 1e-3))
    out = apply_shading(moved, 1.0 + (ratio * occl - 1.0) * sub.fg_soft)
    if shape == "fold":
        luma = float(luminance(img)[bump >= 0.5].mean()) if (bump >= 0.5).any() else 128.0
        crease = np.exp(-((u / max(0.7, 0.05 * radius)) ** 2)) * bump
        out = change_luminance(out, crease, -0.6 * delta if luma > 40 else 0.6 * delta)
    # The defect is where the surface moved by half a pixel or more, or dips (its shaded core).
    core = prof if shape != "fold" else np.exp(-((u / max(0.8, 0.1 * radius)) ** 2)) * bump
    alpha = np.maximum(np.clip(np.hypot(dx, dy), 0, 1), core) * sub.fg_soft
    return Stamp(
        image=np.clip(out, 0, 255).astype(np.float32), alpha=alpha.astype(np.float32), box=box, info=info
    )

"""Missing-material defects: missing, broken, chip — a bite out of the product's outline.

Why at the outline: material breaks off where the product is exposed, so the bite is centred on the
foreground boundary and the background shows through where the product was. The background is
re-synthesised from the nearby background (normalised convolution) so an uneven backdrop stays uneven;
its pixel-scale grain is the input's own detail, which the engine adds back over every defect. Along the new edge a thin fracture face is shaded by the
request's light: lit where it faces the light, dark where it faces away. Textures have no background
to show; there the renderer declines and the engine draws a hole instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools.image_gen.blending import CONTRAST_DELTA, Stamp, change_luminance, composite, luminance
from tools.image_gen.placement import Canvas, NotApplicable
from tools.image_gen.shapes import blob_field, edge_alpha
from tools.vocabulary import DefectSpec

#: Per shape: (radius factor, outline irregularity, outline roughness).
_STYLE: dict[str, tuple[float, float, float]] = {
    "missing": (1.2, 0.2, 0.04),
    "broken": (1.0, 0.28, 0.08),
    "chip": (0.7, 0.25, 0.1),
}


def _boundary_point(canvas: Canvas, radius: float, rng: np.random.Generator) -> tuple[float, float]:
    """A point on the product's outline, in the allowed area when possible and clear of earlier defects."""
    edge = canvas.foreground & (canvas.depth <= 1.5)
    if canvas.occupied.any():
        edge &= ndi.distance_transform_edt(~canvas.occupied) >= radius + 3
    near = edge & ndi.binary_dilation(canvas.allowed, iterations=2)
    # Keep away from the frame: the bite needs background around it to show.
    h, w = canvas.shape
    m = int(min(radius, 0.2 * min(h, w)))
    frame = np.zeros_like(edge)
    frame[m : h - m, m : w - m] = True
    for cand in (near & frame, edge & frame, near, edge):
        ys, xs = np.nonzero(cand)
        if ys.size:
            i = int(rng.integers(0, ys.size))
            return float(xs[i]), float(ys[i])
    raise NotApplicable("no free point on the product's outline")


def background_fill(image: np.ndarray, background: np.ndarray, sigma: float) -> np.ndarray:
    """Estimate what the background looks like at every pixel of a window, from its background pixels.

    Args:
        image: float RGB window.
        background: Bool mask of background pixels in the window.
        sigma: Smoothing scale of the estimate (px).

    Returns:
        float32 RGB window of plausible background.
    """
    wgt = ndi.gaussian_filter(background.astype(np.float32), sigma)
    acc = ndi.gaussian_filter(image * background[..., None], (sigma, sigma, 0))
    mean_bg = image[background].mean(axis=0) if background.any() else image.reshape(-1, 3).mean(axis=0)
    fill = np.where(wgt[..., None] > 0.02, acc / np.maximum(wgt[..., None], 1e-6), mean_bg[None, None, :])
    return fill.astype(np.float32)


def render_missing(canvas: Canvas, spec: DefectSpec, rng: np.random.Generator) -> Stamp:
    """Break a piece off the product's outline.

    Args:
        canvas: Where it may go; must show some background.
        spec: Shape (missing / broken / chip), size, contrast (of the fracture face), softness.
        rng: Source of randomness.

    Returns:
        A `Stamp`; alpha covers the missing piece and its fracture face.

    Raises:
        NotApplicable: On textures, or when the product has no outline to break.
    """
    if canvas.is_texture or (~canvas.foreground).sum() < 0.02 * canvas.foreground.size:
        raise NotApplicable("a texture has no background to show through")
    shape = spec.shape if spec.shape in _STYLE else "missing"
    rfac, irr, rough = _STYLE[shape]
    radius = max(3.0, 0.035 * canvas.diameter, canvas.extent(spec.size, rng) / 2.0 * rfac)
    full_centre = _boundary_point(canvas, radius, rng)
    box = canvas.around(full_centre, 2.2 * radius + 6)
    sub = canvas.crop(box)
    centre = (full_centre[0] - sub.origin[0], full_centre[1] - sub.origin[1])
    field = blob_field(
        sub.shape,
        centre,
        radius,
        rng,
        irregularity=irr,
        harmonics=6,
        roughness=rough + sub.ragged,
        aspect=float(rng.uniform(0.6, 1.0)),
        angle=float(rng.uniform(0, np.pi)),
    )
    sigma = 0.6 if spec.softness == "sharp" else 1.2
    bite = edge_alpha(field, sigma) * sub.fg_soft
    background = ~sub.foreground
    if background.sum() < 8:
        raise NotApplicable("no background next to the chosen outline point")
    fill = background_fill(sub.image, background, max(2.0, radius / 2))
    out = composite(sub.image, fill, bite)
    # Fracture face: a thin band along the new edge, on the remaining product.
    face_w = max(1.2, 0.12 * radius)
    band = np.clip(edge_alpha(field + face_w, 0.6) - edge_alpha(field, 0.6), 0, 1) * sub.fg_soft
    gy, gx = np.gradient(field)
    norm = np.maximum(np.hypot(gx, gy), 1e-6)
    lx, ly = sub.light
    # The face looks into the bite (along +grad field): lit when that direction points away from the light.
    facing = -(gx * lx + gy * ly) / norm
    delta = CONTRAST_DELTA[spec.contrast]
    luma = float(luminance(sub.image)[sub.foreground].mean()) if sub.foreground.any() else 128.0
    out = change_luminance(out, band * np.clip(facing, 0, 1), 0.9 * delta if luma < 215 else -0.5 * delta)
    out = change_luminance(out, band * np.clip(-facing, 0, 1), -0.9 * delta if luma > 40 else 0.5 * delta)
    alpha = np.maximum(bite, band * np.clip(np.abs(facing) * 1.5, 0, 1))
    info: dict[str, Any] = {
        "kind": shape,
        "centre": [round(full_centre[0], 1), round(full_centre[1], 1)],
        "radius_px": round(radius, 1),
        "fracture_face_px": round(face_w, 1),
        "background_rgb": [int(v) for v in fill[background].mean(axis=0)],
        "contrast": spec.contrast,
    }
    return Stamp(
        image=np.clip(out, 0, 255).astype(np.float32),
        alpha=alpha.astype(np.float32),
        box=box,
        info=info,
    )

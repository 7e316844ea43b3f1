"""Texture defects: a patch of foreign-looking surface, transplanted from elsewhere on the product, a
foreign material, or the surface's own texture statistics disturbed (warped weave, changed contrast or
frequency).

Why a transplant: a texture anomaly (a wrong weave, a patch of different grain) is the product's own
material in the wrong arrangement. Taking a patch from another part of the product, turned by 90° or
mirrored so its structure runs the wrong way, gives exactly that, with the right colours and grain.
The seam is feathered and the patch's mean brightness is moved towards the surrounding surface
(plus a small contrast-word offset) so the edge reads as a change of structure, not a pasted square.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools.image_gen.appearance import TEXTURE_OPS, disturb_texture, material_texture
from tools.image_gen.blending import CONTRAST_DELTA, Stamp, change_luminance, composite, luminance
from tools.image_gen.placement import Canvas, sample_centre
from tools.image_gen.shapes import blob_field, edge_alpha
from tools.vocabulary import DefectSpec


#: How a texture defect changes the surface: a turned transplant of the product's own surface, a foreign
#: material texture, or the surface's own statistics disturbed in place (`appearance.TEXTURE_OPS`).
MODES: tuple[str, ...] = ("transplant", "foreign", *TEXTURE_OPS)
MODE_WEIGHTS = (0.3, 0.2, 0.2, 0.15, 0.15)


def _source_patch(
    canvas: Canvas, centre: tuple[float, float], half: int, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[float, float]]:
    """A square patch of side 2·half+1 from elsewhere on the product, as far as possible from `centre`."""
    h, w = canvas.shape
    ok = canvas.foreground & (canvas.depth >= half)
    ok[:half, :] = ok[h - half :, :] = False
    ok[:, :half] = ok[:, w - half :] = False
    ys, xs = np.nonzero(ok)
    if ys.size == 0:
        ys, xs = np.array([int(centre[1])]), np.array([int(centre[0])])
    d = np.hypot(xs - centre[0], ys - centre[1])
    far = d >= min(3.0 * half, float(d.max()))
    idx = np.flatnonzero(far) if far.any() else np.arange(ys.size)
    i = int(rng.choice(idx))
    sy, sx = int(ys[i]), int(xs[i])
    y0, x0 = max(0, sy - half), max(0, sx - half)
    patch = canvas.image[y0 : y0 + 2 * half + 1, x0 : x0 + 2 * half + 1]
    if patch.shape[0] != 2 * half + 1 or patch.shape[1] != 2 * half + 1:
        patch = np.pad(
            patch,
            ((0, 2 * half + 1 - patch.shape[0]), (0, 2 * half + 1 - patch.shape[1]), (0, 0)),
            mode="reflect",
        )
    return patch.astype(np.float32), (float(sx), float(sy))


def render_texture(canvas: Canvas, spec: DefectSpec, rng: np.random.Generator) -> Stamp:
    """Transplant a turned patch of the product's own surface.

    Args:
        canvas: Where it may go.
        spec: Size, contrast (brightness offset of the patch), softness (seam width).
        rng: Source of randomness.

    Returns:
        A `Stamp`; alpha is the patch's feathered outline.
    """
    radius = max(3.0, canvas.extent(spec.size, rng) / 2.0)
    full_centre = sample_centre(canvas, radius, rng)
    half = int(np.ceil(1.6 * radius)) + 2
    patch, source = _source_patch(canvas, full_centre, half, rng)
    k = int(rng.integers(1, 4))
    patch = np.rot90(patch, k)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    box = canvas.around(full_centre, half)
    sub = canvas.crop(box)
    # Place the patch centred on the defect centre inside the window.
    ox = int(round(full_centre[0])) - half - sub.origin[0]
    oy = int(round(full_centre[1])) - half - sub.origin[1]
    layer = sub.image.copy()
    ys0, xs0 = max(0, oy), max(0, ox)
    ys1, xs1 = min(sub.shape[0], oy + patch.shape[0]), min(sub.shape[1], ox + patch.shape[1])
    layer[ys0:ys1, xs0:xs1] = patch[ys0 - oy : ys1 - oy, xs0 - ox : xs1 - ox]
    centre = (full_centre[0] - sub.origin[0], full_centre[1] - sub.origin[1])
    field = blob_field(
        sub.shape,
        centre,
        radius,
        rng,
        irregularity=0.18,
        harmonics=5,
        roughness=0.03 + sub.ragged,
        aspect=float(rng.uniform(0.65, 1)),
        angle=float(rng.uniform(0, np.pi)),
    )
    sigma = max(1.0, 0.15 * radius) if spec.softness == "soft" else max(0.8, 0.07 * radius)
    alpha = edge_alpha(field, sigma) * sub.fg_soft
    # Match the patch's mean brightness to the surface it covers, then offset it by the contrast word.
    inside = alpha >= 0.5
    if inside.any():
        gain = (luminance(sub.image)[inside].mean() + 1.0) / (luminance(layer)[inside].mean() + 1.0)
        layer = np.clip(layer * gain, 0, 255)
    luma = float(luminance(sub.image)[inside].mean()) if inside.any() else 128.0
    delta = 0.45 * CONTRAST_DELTA[spec.contrast]
    sign = -1.0 if luma > 60 else 1.0
    layer = change_luminance(layer, np.ones(sub.shape, np.float32), sign * delta)
    # Slightly different grain: a touch of blur on the transplanted structure.
    layer = ndi.gaussian_filter(layer, (0.4, 0.4, 0))
    # In-place disturbances need a texture to disturb; a smooth product gets a transplant or a material.
    modes, weights = (MODES, MODE_WEIGHTS) if canvas.is_texture else (MODES[:2], (0.6, 0.4))
    mode = str(rng.choice(modes, p=weights))
    if mode == "foreign":
        # A material this surface is not made of, at the surface's own spread, over its local mean.
        spread = max(float(luminance(sub.image).std()), 6.0)
        material = material_texture(sub.shape, rng, scale=float(rng.uniform(0.5, 2.0)))
        layer = ndi.gaussian_filter(sub.image, (2.0, 2.0, 0)) + (spread * material)[..., None]
    elif mode != "transplant":
        # The surface's own statistics disturbed in place: weave/grain warp, contrast or frequency change.
        layer = disturb_texture(sub.image, np.ones(sub.shape, np.float32), mode, 2.0 * radius, rng)
    out = composite(sub.image, layer, alpha)
    info: dict[str, Any] = {
        "kind": "texture",
        "centre": [round(full_centre[0], 1), round(full_centre[1], 1)],
        "radius_px": round(radius, 1),
        "source_centre": [round(source[0], 1), round(source[1], 1)],
        "rotation_deg": 90 * k,
        "mode": mode,
        "seam_sigma_px": round(sigma, 2),
        "brightness_offset": round(sign * delta, 1),
        "contrast": spec.contrast,
    }
    return Stamp(image=out.astype(np.float32), alpha=alpha.astype(np.float32), box=box, info=info)

"""Hole defects: hole, pit, poke, dent — depressions shaded from a height field.

Why a height field: the cue that makes a hole read as a hole is consistent lighting. We build the
depression's height profile (steep walls and a slightly raised lip for a hole, a shallow bowl for a
dent), derive surface normals from it and shade with the request's single light direction: the wall
nearest the light falls in shadow, the far wall and the lip facing the light are lit. A hole's floor
also darkens by ambient occlusion and by the shadow the near wall casts onto it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools.image_gen.blending import (
    CONTRAST_DELTA,
    TINT_STRENGTH,
    Stamp,
    edge_sigma,
    luminance,
    named_rgb,
    tint,
)
from tools.image_gen.placement import Canvas, sample_centre
from tools.image_gen.shapes import blob_field, edge_alpha
from tools.vocabulary import DefectSpec

#: Elevation of the light above the surface, degrees from the vertical.
LIGHT_ZENITH_DEG = 50.0

#: Per shape: (radius factor, depth/radius, floor darkening per contrast word, rim lip, outline roughness).
_STYLE: dict[str, tuple[float, float, dict[str, float], float, float]] = {
    "hole": (0.9, 0.6, {"low": 0.45, "medium": 0.62, "high": 0.78}, 0.10, 0.02),
    "pit": (0.6, 0.45, {"low": 0.38, "medium": 0.52, "high": 0.68}, 0.06, 0.03),
    "poke": (0.75, 0.55, {"low": 0.42, "medium": 0.58, "high": 0.74}, 0.16, 0.09),
    "dent": (1.0, 0.0, {"low": 0.0, "medium": 0.0, "high": 0.0}, 0.0, 0.01),
}

#: Dent depth relative to its radius per contrast word (steeper slopes shade more).
_DENT_DEPTH = {"low": 0.22, "medium": 0.36, "high": 0.55}
#: Depth of holes, pits and pokes per contrast word (steeper walls shade darker).
_DEPTH_SCALE = {"low": 0.45, "medium": 0.75, "high": 1.0}
#: Share of ambient (direction-less) light per contrast word.
_AMBIENT = {"low": 0.55, "medium": 0.3, "high": 0.1}
_DENT_OCCLUSION = {"low": 0.06, "medium": 0.09, "high": 0.12}


def shade_from_height(
    height: np.ndarray, light: tuple[float, float], zenith_deg: float = LIGHT_ZENITH_DEG
) -> np.ndarray:
    """Lambertian shading ratio of a height field relative to the flat surface.

    Args:
        height: Height in pixels (negative = below the surface).
        light: Unit (x, y) direction towards the light in image coordinates.
        zenith_deg: Angle of the light from the vertical.

    Returns:
        float32 ratio (H, W): 1 where flat, < 1 on slopes turned away from the light, > 1 towards it.
    """
    gy, gx = np.gradient(height.astype(np.float32))
    z = np.deg2rad(zenith_deg)
    lvec = np.array([light[0] * np.sin(z), light[1] * np.sin(z), np.cos(z)], np.float32)
    norm = np.sqrt(gx * gx + gy * gy + 1.0)
    ndotl = (-gx * lvec[0] - gy * lvec[1] + lvec[2]) / norm
    return (np.clip(ndotl, 0.0, None) / lvec[2]).astype(np.float32)


def apply_shading(image: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Apply a shading ratio: multiply where darker, brighten by the same factor where brighter (capped
    below white, so highlights do not blow out)."""
    r = ratio[..., None]
    dark = image * np.minimum(r, 1.0)
    # Brightening scales like darkening (×r) until it runs out of headroom, then saturates softly.
    lift = np.minimum(image * np.maximum(r - 1.0, 0.0), (255.0 - image) * 0.6)
    return np.where(r > 1.0, image + lift, dark).astype(np.float32)


def render_hole(canvas: Canvas, spec: DefectSpec, rng: np.random.Generator) -> Stamp:
    """Draw one depression (hole, pit, poke or dent) on the canvas.

    Args:
        canvas: Where it may go, with the request's light direction.
        spec: Shape, size, contrast, softness, colour (a named colour tints the floor).
        rng: Source of randomness.

    Returns:
        A `Stamp`; alpha is the depression's footprint (the lit lip outside it is a faint halo).
    """
    shape = spec.shape if spec.shape in _STYLE else "hole"
    rfac, depth_ratio, floor_dark, lip, rough = _STYLE[shape]
    extent = canvas.extent(spec.size, rng)
    radius = max(1.0, extent / 2.0 * rfac)
    full_centre = sample_centre(canvas, radius * 1.25, rng)
    sigma = edge_sigma(spec.softness, radius) if spec.softness == "soft" else 0.6
    box = canvas.around(full_centre, 1.6 * radius + 3.5 * sigma + 4)
    canvas = canvas.crop(box)  # from here on, local coordinates
    centre = (full_centre[0] - canvas.origin[0], full_centre[1] - canvas.origin[1])
    field = blob_field(
        canvas.shape,
        centre,
        radius,
        rng,
        irregularity=0.06 if shape != "poke" else 0.15,
        harmonics=5,
        roughness=rough + 0.6 * canvas.ragged,
        aspect=float(rng.uniform(0.8, 1.0)),
        angle=float(rng.uniform(0, np.pi)),
    )
    footprint = edge_alpha(field, sigma) * canvas.fg_soft
    img = canvas.image
    luma = float(luminance(img)[footprint >= 0.5].mean()) if (footprint >= 0.5).any() else 128.0
    info: dict[str, Any] = {
        "kind": shape,
        "centre": [round(full_centre[0], 1), round(full_centre[1], 1)],
        "radius_px": round(radius, 1),
        "edge_sigma_px": round(sigma, 2),
        "light_xy": [round(canvas.light[0], 3), round(canvas.light[1], 3)],
        "contrast": spec.contrast,
    }
    if shape == "dent":
        depth = _DENT_DEPTH[spec.contrast] * radius
        # A smooth bowl that reaches zero slope at the outline.
        s = np.clip(field / max(radius, 1.0), 0, 1)
        height = -depth * (3 * s**2 - 2 * s**3)
        height = ndi.gaussian_filter(height, max(0.8, 0.08 * radius))
        # Some ambient light reaches every slope: a dent's steep side is dark, never black.
        ratio = 0.3 + 0.7 * shade_from_height(height, canvas.light)
        # A dent also darkens a little overall (it catches less of the diffuse light), which keeps
        # the whole bowl visible, not only its two slopes.
        occlusion = 1.0 - _DENT_OCCLUSION[spec.contrast] * (-height / max(depth, 1e-3))
        out = apply_shading(img, (1.0 + (ratio * occlusion - 1.0) * canvas.fg_soft))
        info["depth_px"] = round(float(depth), 1)
        return Stamp(image=out, alpha=footprint.astype(np.float32), box=box, info=info)

    depth = depth_ratio * radius * _DEPTH_SCALE[spec.contrast]
    wall = max(1.0, 0.3 * radius)
    inner = np.clip(field / wall, 0, 1)
    height = -depth * (inner**0.7)
    lip_width = max(1.0, 0.15 * radius)
    if lip > 0:
        height = height + lip * radius * np.exp(-((field / lip_width) ** 2)) * (field < 0)
    height = ndi.gaussian_filter(height, max(0.5, sigma * 0.8))
    # Ambient fill light: lower contrast words keep the shadowed wall from going black.
    amb = _AMBIENT[spec.contrast]
    ratio = amb + (1.0 - amb) * shade_from_height(height, canvas.light)
    out = apply_shading(img, 1.0 + (ratio - 1.0) * canvas.fg_soft)
    # Floor: ambient occlusion deepening towards the centre, and the near wall's cast shadow.
    lum = max(luma, 1.0)
    # Floor darkening: the family's own depth, capped so that the floor's change stays near the
    # contrast word's magnitude (a "low contrast" pit is a shallow grey, not a black dot).
    dark = min(floor_dark[spec.contrast], 1.7 * CONTRAST_DELTA[spec.contrast] / lum)
    # On a very dark surface a darker floor is not visible; darken relative to a lifted floor instead.
    occl = footprint * (0.8 + 0.2 * inner)
    z = np.deg2rad(LIGHT_ZENITH_DEG)
    reach = depth * np.tan(z)
    lx, ly = canvas.light
    ahead = ndi.shift(footprint, (-ly * reach, -lx * reach), order=1, mode="constant")
    cast = footprint * ahead
    factor = 1.0 - dark * occl - 0.25 * dark * cast
    out = out * np.clip(factor, 0.05, 1.0)[..., None]
    if lum < 45:
        # Dark products: the hole shows a lighter broken interior instead of an invisible darker one.
        out = out + (CONTRAST_DELTA[spec.contrast] * 0.8 * occl)[..., None]
        info["lifted_floor"] = True
    rgb = named_rgb(spec.colour)
    if rgb is not None:
        out = tint(out, footprint * inner * TINT_STRENGTH[spec.contrast], rgb * 0.7)
        info["colour_rgb"] = rgb.astype(int).tolist()
    if lip > 0:
        # The raised lip is part of the defect (a lit and a shaded crescent around the opening).
        footprint = np.maximum(footprint, edge_alpha(field + 1.3 * lip_width, sigma) * canvas.fg_soft)
    info.update({"depth_px": round(float(depth), 1), "floor_darkening": dark})
    return Stamp(
        image=np.clip(out, 0, 255).astype(np.float32), alpha=footprint.astype(np.float32), box=box, info=info
    )

"""Blob defects: stain, contamination, discoloration, liquid/oil, glue, rough.

Why one family: all are an irregular patch on the surface; they share the outline (a random radial
function with fine noise) and placement, and differ in what happens inside: a stain absorbs (darkens or
tints, texture kept, a slightly darker drying ring), contamination is foreign matter lying on top
(particles with their own colour, texture and tiny shadows), discoloration shifts hue/brightness with a
very soft edge, liquid is a dark glossy film with a meniscus and a specular highlight, glue is a
translucent drop that blurs what is under it and catches a highlight, rough is local grain.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools.image_gen.blending import (
    CONTRAST_DELTA,
    TINT_STRENGTH,
    Stamp,
    change_luminance,
    composite,
    edge_sigma,
    luminance,
    named_rgb,
    polarity,
    surface_change,
    tint,
)
from tools.image_gen.placement import Canvas, sample_centre
from tools.image_gen.shapes import blob_field, edge_alpha, smooth_noise
from tools.vocabulary import DefectSpec

#: Outline style per shape: (irregularity, harmonics, roughness, min aspect).
_OUTLINE: dict[str, tuple[float, int, float, float]] = {
    "stain": (0.22, 6, 0.05, 0.55),
    "discoloration": (0.15, 4, 0.02, 0.6),
    "liquid": (0.14, 4, 0.0, 0.5),
    "oil": (0.14, 4, 0.0, 0.5),
    "glue": (0.10, 4, 0.0, 0.6),
    "rough": (0.25, 6, 0.06, 0.5),
    "contamination": (0.3, 5, 0.08, 0.6),
}


def _outline(
    canvas: Canvas, spec: DefectSpec, rng: np.random.Generator, radius: float, centre: tuple[float, float]
) -> np.ndarray:
    irr, harm, rough, min_aspect = _OUTLINE.get(spec.shape, _OUTLINE["stain"])
    return blob_field(
        canvas.shape,
        centre,
        radius,
        rng,
        irregularity=irr,
        harmonics=harm,
        roughness=rough + canvas.ragged,
        aspect=float(rng.uniform(min_aspect, 1.0)),
        angle=float(rng.uniform(0, np.pi)),
    )


def _specular(
    canvas: Canvas,
    centre: tuple[float, float],
    radius: float,
    field: np.ndarray,
    size: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Coverage of a small elongated highlight on the light side of a glossy blob, inside it."""
    lx, ly = canvas.light
    hc = (centre[0] + lx * 0.4 * radius, centre[1] + ly * 0.4 * radius)
    hr = max(1.0, size * radius)
    hf = blob_field(
        canvas.shape,
        hc,
        hr,
        rng,
        irregularity=0.05,
        harmonics=3,
        aspect=0.45,
        angle=float(np.arctan2(ly, lx) + np.pi / 2),
    )
    return edge_alpha(hf, max(0.6, 0.35 * hr)) * edge_alpha(field - 1.0, 0.8)


def _facing(canvas: Canvas, centre: tuple[float, float], width: float) -> np.ndarray:
    """0..1 weight of the side of a blob that faces the light (1 on the light side, 0 on the far side)."""
    yy, xx = np.mgrid[0 : canvas.shape[0], 0 : canvas.shape[1]].astype(np.float32)
    dx, dy = xx - centre[0], yy - centre[1]
    r = np.maximum(np.hypot(dx, dy), 1e-3)
    cos = (dx * canvas.light[0] + dy * canvas.light[1]) / r
    return np.clip((cos + width) / (1 + width), 0, 1).astype(np.float32)


def _sheen(
    canvas: Canvas, centre: tuple[float, float], radius: float, field: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A broad soft highlight band across the light-facing half of a glossy blob, inside it."""
    lx, ly = canvas.light
    hc = (centre[0] + lx * 0.35 * radius, centre[1] + ly * 0.35 * radius)
    hf = blob_field(canvas.shape, hc, 0.55 * radius, rng, irregularity=0.1, harmonics=3, aspect=0.4,
                    angle=float(np.arctan2(ly, lx) + np.pi / 2 + rng.normal(0, 0.3)))
    return (edge_alpha(hf, max(1.0, 0.3 * radius)) * edge_alpha(field - 1.5, 1.0) * 0.55).astype(np.float32)


def render_blob(canvas: Canvas, spec: DefectSpec, rng: np.random.Generator) -> Stamp:
    """Draw one blob defect of `spec.shape` on the canvas.

    Args:
        canvas: Where it may go (foreground, allowed area, earlier defects, light direction).
        spec: Shape, size, contrast, softness, colour.
        rng: Source of randomness.

    Returns:
        A `Stamp`; alpha is the patch's coverage (0.5 on its outline).
    """
    shape = spec.shape if spec.shape in _OUTLINE else "stain"
    extent = canvas.extent(spec.size, rng)
    radius = extent / 2.0
    full_centre = sample_centre(canvas, radius * 1.1, rng)
    sigma = edge_sigma(spec.softness, radius)
    if spec.softness == "sharp":
        # Even a "sharp" stain is not cut out with scissors: its edge fades over a pixel or two.
        sigma = max(sigma, 0.8 + 0.04 * radius)
    if shape == "discoloration":
        sigma = max(sigma, 0.2 * radius)
    box = canvas.around(full_centre, 1.9 * radius + 3.5 * sigma + 3)
    sub = canvas.crop(box)
    centre = (full_centre[0] - sub.origin[0], full_centre[1] - sub.origin[1])
    if shape == "contamination":
        return _contamination(sub, spec, rng, centre, radius, box)
    field = _outline(sub, spec, rng, radius, centre)
    alpha = edge_alpha(field, sigma) * sub.fg_soft
    delta = CONTRAST_DELTA[spec.contrast]
    inside = alpha >= 0.5
    img = sub.image
    luma = float(luminance(img)[inside].mean()) if inside.any() else 128.0
    info: dict[str, Any] = {
        "kind": shape,
        "centre": [round(full_centre[0], 1), round(full_centre[1], 1)],
        "radius_px": round(radius, 1),
        "edge_sigma_px": round(sigma, 2),
        "contrast": spec.contrast,
    }
    mottle = smooth_noise(sub.shape, max(1.0, radius / 3), rng)
    if shape == "stain":
        # Drying ring: solute collects at the edge, so the rim is a little stronger than the middle.
        ring = 0.25 * np.exp(-((field / max(0.18 * radius, 1.0)) ** 2))
        weight = alpha * np.clip(0.8 + 0.12 * mottle + ring, 0.4, 1.2)
        out, ci = surface_change(img, weight, spec, delta, luma)
    elif shape == "discoloration":
        weight = alpha * np.clip(0.9 + 0.1 * mottle, 0.6, 1.1)
        rgb = named_rgb(spec.colour)
        if rgb is None:
            # Brightness shift with a faint yellowing (oxidation / heat tint).
            sign = polarity(spec.colour, luma, delta)
            out = change_luminance(img, weight, sign * 0.85 * delta)
            warm = np.array([1.0, 0.96, 0.86], np.float32)
            out = out * (1 + weight[..., None] * (warm - 1) * (0.6 + delta / 100))
            ci = {"polarity": "light" if sign > 0 else "dark", "delta": 0.85 * delta, "warm_shift": True}
        else:
            out, ci = surface_change(img, weight, spec, delta, luma)
    elif shape in ("liquid", "oil"):
        rgb = named_rgb(spec.colour)
        meniscus = 0.3 * np.exp(-((field / max(0.1 * radius, 0.8)) ** 2))
        weight = alpha * np.clip(1.0 + meniscus + 0.06 * mottle, 0, 1.4)
        sign = polarity("dark" if rgb is None else spec.colour, luma, delta)
        out = change_luminance(img, weight, sign * 1.1 * delta)
        ci = {"polarity": "light" if sign > 0 else "dark", "delta": 1.1 * delta}
        if rgb is not None:
            out = tint(out, alpha * TINT_STRENGTH[spec.contrast] * 0.7, rgb)
            ci["colour_rgb"] = rgb.astype(int).tolist()
        # A glossy film: a broad, soft sheen on the side facing the light (not a white dot), and a thin
        # bright meniscus line along the lit edge.
        sheen = _sheen(sub, centre, radius, field, rng)
        out = change_luminance(out, sheen, 0.35 * (255 - luma))
        rim = np.exp(-(((field - 0.8) / 0.8) ** 2)) * alpha * _facing(sub, centre, 0.6)
        out = change_luminance(out, rim * 0.5, 0.3 * (255 - luma))
    elif shape == "glue":
        rgb = named_rgb(spec.colour)
        rgb = np.array([226, 206, 150], np.float32) if rgb is None else rgb
        blurred = ndi.gaussian_filter(img, sigma=(1.2, 1.2, 0))  # refraction through the drop
        out = composite(img, blurred, alpha)
        strength = {"low": 0.22, "medium": 0.35, "high": 0.5}[spec.contrast]
        out = tint(out, alpha * strength, rgb)
        edge = np.exp(-((field / max(0.1 * radius, 0.8)) ** 2)) * alpha
        sign = polarity("dark", luma, delta)
        out = change_luminance(out, edge, sign * 0.6 * delta)
        out = change_luminance(out, alpha, 0.25 * delta if luma < 200 else -0.25 * delta)
        spec_cov = _specular(sub, centre, radius, field, 0.16, rng)
        out = change_luminance(out, spec_cov, 0.7 * (255 - luma))
        ci = {"colour_rgb": rgb.astype(int).tolist(), "tint_strength": strength, "translucent": True}
    else:  # rough
        # Grain: the surface change varies from pixel to pixel (0.55..1.45 of its mean), so the
        # patch reads as pitted/granular while every pixel in it still changes the same way.
        grain = np.clip(1.0 + 0.45 * smooth_noise(sub.shape, 0.8, rng), 0.55, 1.45)
        out, ci = surface_change(img, alpha * grain, spec, delta, luma)
        ci["grain_amplitude"] = 0.45
    info.update(ci)
    return Stamp(
        image=np.clip(out, 0, 255).astype(np.float32), alpha=alpha.astype(np.float32), box=box, info=info
    )


def _contamination(
    canvas: Canvas,
    spec: DefectSpec,
    rng: np.random.Generator,
    centre: tuple[float, float],
    radius: float,
    box: tuple[int, int, int, int],
) -> Stamp:
    """A cluster of foreign particles lying on the surface, each with its own texture and a tiny shadow."""
    n = {
        "tiny": 1,
        "small": int(rng.integers(2, 4)),
        "medium": int(rng.integers(3, 6)),
        "large": int(rng.integers(5, 9)),
    }[spec.size]
    rgb = named_rgb(spec.colour)
    img = canvas.image
    luma = (
        float(luminance(img)[canvas.foreground].mean())
        if canvas.foreground.any()
        else float(luminance(img).mean())
    )
    if rgb is None:
        sign = polarity(spec.colour, luma, CONTRAST_DELTA[spec.contrast])
        rgb = np.array([58, 44, 34], np.float32) if sign < 0 else np.array([228, 224, 212], np.float32)
    mix = min(1.0, TINT_STRENGTH[spec.contrast] + 0.1)
    alpha = np.zeros(canvas.shape, np.float32)
    texture = smooth_noise(canvas.shape, 0.8, rng)
    particles = []
    min_r = 0.8 if canvas.look is not None else max(1.6, 0.012 * canvas.diameter)
    for i in range(n):
        if i == 0 or n == 1:
            pc = centre
            pr = max(min_r, radius * (0.9 if n == 1 else rng.uniform(0.3, 0.45)))
        else:
            ang = rng.uniform(0, 2 * np.pi)
            dist = radius * rng.uniform(0.35, 0.9)
            pc = (centre[0] + dist * np.cos(ang), centre[1] + dist * np.sin(ang))
            pr = max(min_r, radius * rng.uniform(0.12, 0.3))
        pf = blob_field(
            canvas.shape,
            pc,
            pr,
            rng,
            irregularity=0.3,
            harmonics=5,
            roughness=0.06 + canvas.ragged,
            aspect=float(rng.uniform(0.5, 1)),
            angle=float(rng.uniform(0, np.pi)),
        )
        alpha = np.maximum(
            alpha, edge_alpha(pf, edge_sigma(spec.softness, pr) if spec.softness == "soft" else 0.6)
        )
        ox, oy = canvas.origin
        particles.append(
            {
                "centre": [round(float(pc[0]) + ox, 1), round(float(pc[1]) + oy, 1)],
                "radius_px": round(float(pr), 1),
            }
        )
    alpha = alpha * canvas.fg_soft
    surface = img[alpha >= 0.5].mean(axis=0) if (alpha >= 0.5).any() else img.reshape(-1, 3).mean(axis=0)
    colour = surface * (1 - mix) + rgb * mix
    body = np.clip(colour[None, None, :] * (1 + 0.12 * texture)[..., None], 0, 255)
    # Lit on the light side: a small brightness gradient inside each particle.
    lx, ly = canvas.light
    gy, gx = np.gradient(ndi.gaussian_filter(alpha, 1.0))
    body = np.clip(body * (1 + 0.6 * (gx * lx + gy * ly))[..., None], 0, 255)
    shadow = ndi.shift(alpha, (-ly * 1.2, -lx * 1.2), order=1, mode="constant")
    out = change_luminance(
        img, np.clip(shadow - alpha, 0, 1) * 0.5 * canvas.fg_soft, -0.3 * CONTRAST_DELTA[spec.contrast]
    )
    out = composite(out, body, alpha)
    info = {
        "kind": "contamination",
        "centre": [round(centre[0] + canvas.origin[0], 1), round(centre[1] + canvas.origin[1], 1)],
        "radius_px": round(radius, 1),
        "particles": particles,
        "colour_rgb": [int(v) for v in colour],
        "contrast": spec.contrast,
    }
    return Stamp(image=out.astype(np.float32), alpha=alpha.astype(np.float32), box=box, info=info)

"""Line defects: scratch, crack, cut, thread/fibre/hair, print/stroke.

Why one family: all of them follow a path and are thin across it, so they share placement (a path that
stays on the product) and rendering (a distance field to the path, a width profile along it). They
differ in the path (gentle arc, jagged polyline with branches, straight slit, loose curl, broad smear)
and in the cross-section (a groove that is darker or lighter with a faint lit lip, a dark gap with a thin
shadow, a wide dark slit with a lit lip, a strand lying on top with its own shading and shadow, a
streaky smear of ink).
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
)
from tools.image_gen.placement import Canvas, sample_centre
from tools.image_gen.shapes import PathField, centred_path, edge_alpha, path_field, random_path, smooth_noise
from tools.vocabulary import DefectSpec

_SIZE_WIDTH = {"tiny": 0.8, "small": 0.9, "medium": 1.0, "large": 1.15}

#: Path style per shape: (length × extent, turn, smooth, pull, total bend (rad, sd), width × base width).
_STYLE: dict[str, tuple[float, float, float, float, float, float]] = {
    "scratch": (2.0, 0.015, 6.0, 0.0, 0.25, 1.0),
    "crack": (1.8, 0.30, 0.0, 0.2, 0.0, 1.15),
    "cut": (1.4, 0.01, 6.0, 0.0, 0.1, 2.6),
    "thread": (2.2, 0.20, 4.0, 0.0, 0.8, 1.0),
    "fibre": (2.0, 0.20, 4.0, 0.0, 0.8, 0.9),
    "hair": (2.4, 0.12, 5.0, 0.0, 0.9, 0.85),
    "print": (1.4, 0.03, 5.0, 0.0, 0.3, 1.0),
    "stroke": (1.4, 0.03, 5.0, 0.0, 0.3, 1.0),
}


def base_width(canvas: Canvas, size: str) -> float:
    """Width of a scratch in pixels: about 1% of the product's diameter, at least 2 px."""
    return float(max(2.0, min(6.0, 0.01 * canvas.diameter) * _SIZE_WIDTH.get(size, 1.0)))


def _place_path(
    canvas: Canvas, rng: np.random.Generator, length: float, width: float, style: tuple
) -> tuple[np.ndarray, float]:
    """Find a path that stays on the product: try a few centres and headings, keep the best.

    Returns:
        (points (N, 2) in full-image coordinates, initial heading in radians).
    """
    _, turn, smooth, pull, bend_sd, _ = style
    best: tuple[float, np.ndarray, float] | None = None
    h, w = canvas.shape
    step = max(1.5, min(3.0, length / 20.0))
    n_steps = max(1.0, length / step)
    for attempt in range(10):
        # Ask for less depth on later attempts: a long line on a thin product must run along it.
        radius = length / 2.0 * (1.0 if attempt < 4 else 0.5)
        cx, cy = sample_centre(canvas, radius, rng)
        heading = float(rng.uniform(0, np.pi * 2))
        bend = float(rng.normal(0, bend_sd)) / n_steps
        pts = centred_path(
            (cx, cy), heading, length, rng, step=step, turn=turn, smooth=smooth, pull=pull, bend=bend
        )
        xi = np.clip(np.round(pts[:, 0]).astype(int), 0, w - 1)
        yi = np.clip(np.round(pts[:, 1]).astype(int), 0, h - 1)
        inside = (pts[:, 0] >= 0) & (pts[:, 0] <= w - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= h - 1)
        score = float((inside & (canvas.depth[yi, xi] >= width)).mean())
        if best is None or score > best[0]:
            best = (score, pts, heading)
        if score >= 0.99:
            break
    assert best is not None
    return best[1], best[2]


def _ends(t: np.ndarray) -> np.ndarray:
    """Strength along the path: 1 over most of it, fading to 0 over the last ~10% at both ends."""
    return (np.clip(np.sin(np.pi * np.clip(t, 0, 1)) / 0.35, 0, 1) ** 0.7).astype(np.float32)


def _half_width(
    field: PathField, width: float, rng: np.random.Generator, wobble: float = 0.15, lens: bool = False
) -> np.ndarray:
    """Half-width (px) at each pixel's nearest path point: slight wobble, narrower towards the ends."""
    knots = rng.normal(0, 1, 8)
    wob = 1.0 + wobble * np.interp(field.t, np.linspace(0, 1, 8), knots)
    s = np.clip(np.sin(np.pi * np.clip(field.t, 0, 1)), 0, 1)
    taper = s**0.6 if lens else 0.6 + 0.4 * s**0.5
    return np.maximum(0.5 * width * wob * taper, 0.0).astype(np.float32)


def _lip(
    field: PathField,
    half: np.ndarray,
    thickness: float,
    light: tuple[float, float],
    towards_light: bool = True,
) -> np.ndarray:
    """Coverage of a thin band running beside the line, on the side facing (or away from) the light."""
    facing = field.normal[0] * light[0] + field.normal[1] * light[1]  # > 0: the +side faces the light
    s = field.side * np.where(facing >= 0, 1.0, -1.0) * (1.0 if towards_light else -1.0)
    centre = half + 0.5 * thickness
    valid = field.dist < 1e5
    return (edge_alpha(0.5 * thickness - np.abs(s - centre), 0.5) * valid).astype(np.float32)


def render_line(canvas: Canvas, spec: DefectSpec, rng: np.random.Generator) -> Stamp:
    """Draw one line defect of `spec.shape` on the canvas.

    Args:
        canvas: Where it may go (foreground, allowed area, earlier defects, light direction).
        spec: Shape, size, contrast, softness, colour.
        rng: Source of randomness.

    Returns:
        A `Stamp` whose alpha is the line's body (a scratch's lip, a crack's or strand's shadow are
        fainter context outside it; a cut's lit lip is part of it).
    """
    shape = spec.shape if spec.shape in _STYLE else "scratch"
    style = _STYLE[shape]
    extent = canvas.extent(spec.size, rng)
    length = style[0] * extent
    width = base_width(canvas, spec.size) * style[5]
    if canvas.look is not None:
        # The look's width: from a hairline to a broad gouge, relative to the line's extent; a line stays
        # at most an eighth as broad as it is long.
        width = float(np.clip(canvas.look.width_frac * extent * style[5], 1.0, 0.125 * length + 1.0))
    if shape in ("print", "stroke"):
        width = max(2.5 if canvas.look is not None else 4.0, 0.28 * extent)
    pts, heading = _place_path(canvas, rng, length, width, style)
    delta = CONTRAST_DELTA[spec.contrast]
    sigma = edge_sigma(spec.softness, width / 2)
    margin = width * 2.5 + 3 * sigma + 3
    reach_extra = 0.6 * length if shape == "crack" else 0.0  # branches may leave the trunk's box
    box = canvas.window(
        pts[:, 0].min() - margin - reach_extra,
        pts[:, 1].min() - margin - reach_extra,
        pts[:, 0].max() + margin + reach_extra,
        pts[:, 1].max() + margin + reach_extra,
    )
    sub = canvas.crop(box)
    local = pts - np.array(sub.origin, np.float32)
    field = path_field(local, sub.shape, margin)
    half = _half_width(field, width, rng, wobble=0.15 + 1.5 * canvas.ragged, lens=shape == "cut")
    strength = _ends(field.t) * (0.88 + 0.12 * np.interp(field.t, np.linspace(0, 1, 6), rng.uniform(0, 1, 6)))
    cover = edge_alpha(half - field.dist, sigma) * sub.fg_soft
    alpha = cover * strength
    info: dict[str, Any] = {
        "kind": shape,
        "centre": [round(float(v), 1) for v in pts[len(pts) // 2]],
        "length_px": round(float(length), 1),
        "width_px": round(float(width), 2),
        "angle_deg": round(float(np.rad2deg(heading)) % 360, 1),
        "edge_sigma_px": round(sigma, 2),
        "contrast": spec.contrast,
    }
    img = sub.image
    inside = alpha >= 0.5
    luma = float(luminance(img)[inside].mean()) if inside.any() else float(luminance(img).mean())

    if shape == "scratch":
        out, ci = surface_change(img, alpha, spec, delta, luma)
        sign = -1 if ci.get("polarity", "dark") == "dark" else 1
        # A faint lip of the opposite polarity on the side facing the light (context, not in alpha).
        lip = _lip(field, half, max(1.0, 0.5 * width), sub.light) * strength * sub.fg_soft
        out = change_luminance(out, lip * (1 - cover), -sign * 0.12 * delta)
        info.update(ci)
    elif shape == "crack":
        out, alpha, ci = _crack(sub, spec, rng, local, width, sigma, margin, delta, luma, alpha)
        info.update(ci)
    elif shape == "cut":
        sign = polarity("dark", luma, delta * 1.3)
        depth_grad = np.clip(1.0 - field.dist / np.maximum(half, 0.5), 0, 1) ** 0.5
        out = change_luminance(img, alpha * (0.75 + 0.25 * depth_grad), sign * delta * 1.3)
        if named_rgb(spec.colour) is not None:
            out, ci = surface_change(out, alpha * 0.5, spec, delta, luma)
            info.update(ci)
        # The lip facing the light is pushed up and catches it: part of the defect.
        lip = _lip(field, half, max(1.2, 0.35 * width), sub.light) * strength * sub.fg_soft * (1 - cover)
        out = change_luminance(out, lip, -sign * 0.9 * delta)
        alpha = np.maximum(alpha, lip)
        info["polarity"] = "dark" if sign < 0 else "light"
    elif shape in ("thread", "fibre", "hair"):
        out, ci = _strand(sub, spec, field, half, alpha, delta, luma)
        info.update(ci)
    else:  # print / stroke
        out, alpha, ci = _stroke(sub, spec, rng, field, half, cover, strength, delta, luma)
        info.update(ci)
    return Stamp(image=out.astype(np.float32), alpha=alpha.astype(np.float32), box=box, info=info)


def _crack(
    sub: Canvas,
    spec: DefectSpec,
    rng: np.random.Generator,
    pts: np.ndarray,
    width: float,
    sigma: float,
    margin: float,
    delta: float,
    luma: float,
    alpha: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A dark jagged gap with up to two thinner branches and a faint thin shadow along one side."""
    n_branch = int(rng.integers(0, 3))
    total = alpha.copy()
    light = sub.light
    for _ in range(n_branch):
        k = int(rng.integers(len(pts) // 4, max(len(pts) // 4 + 1, 3 * len(pts) // 4)))
        seg = pts[min(k + 1, len(pts) - 1)] - pts[max(k - 1, 0)]
        base = float(np.arctan2(seg[1], seg[0]))
        heading = base + float(rng.choice([-1, 1]) * rng.uniform(0.4, 1.0))
        blen = float(rng.uniform(0.25, 0.5)) * float(np.linalg.norm(pts[-1] - pts[0]) + 1)
        bpts = random_path(
            tuple(pts[k]), heading, blen, rng, step=max(1.5, blen / 10), turn=0.3, smooth=0, pull=0.2
        )
        bf = path_field(bpts, sub.shape, margin)
        # Branches start nearly as wide as the trunk and fade to a point.
        fade = np.clip(1.0 - bf.t, 0, 1)
        bhalf = np.maximum(0.5 * 0.8 * width * (0.6 + 0.4 * fade), 0.0)
        bstrength = np.clip(fade / 0.3, 0, 1) ** 0.7
        balpha = edge_alpha(bhalf - bf.dist, sigma) * bstrength * sub.fg_soft
        # Keep branches whose points stay on the product.
        total = np.maximum(total, balpha)
    shadows = (
        ndi.shift(total, (-light[1] * 0.7 * width, -light[0] * 0.7 * width), order=1, mode="constant")
        * sub.fg_soft
    )
    sign = polarity("dark", luma, delta * 1.25)
    out = change_luminance(sub.image, np.clip(shadows - total, 0, 1) * 0.16, sign * delta)
    if named_rgb(spec.colour) is not None:
        out, ci = surface_change(out, total, spec, delta, luma)
        out = change_luminance(out, total * 0.5, sign * delta)
    else:
        out = change_luminance(out, total, sign * delta * 1.25)
        ci = {"polarity": "dark" if sign < 0 else "light", "delta": delta * 1.25}
    ci["branches"] = n_branch
    return out, total.astype(np.float32), ci


def _strand(
    sub: Canvas,
    spec: DefectSpec,
    field: PathField,
    half: np.ndarray,
    alpha: np.ndarray,
    delta: float,
    luma: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A strand lying on the surface: own colour, cylindrical shading, a small soft shadow beside it."""
    rgb = named_rgb(spec.colour)
    if rgb is None:
        sign = polarity(spec.colour, luma, delta)
        rgb = np.array([38, 32, 28], np.float32) if sign < 0 else np.array([232, 228, 218], np.float32)
    inside = alpha >= 0.5
    surface = sub.image[inside].mean(axis=0) if inside.any() else sub.image.reshape(-1, 3).mean(axis=0)
    # Lower contrast: the strand's colour lies closer to the surface's (a pale hair on a pale surface).
    mix = min(1.0, TINT_STRENGTH[spec.contrast] + 0.12)
    colour = surface * (1 - mix) + rgb * mix
    light = sub.light
    across = np.clip(field.side / np.maximum(half, 0.3), -1, 1)
    facing = field.normal[0] * light[0] + field.normal[1] * light[1]
    lit_side = across * np.where(facing >= 0, 1.0, -1.0)
    w = float(np.max(half)) * 2
    if w >= 4.0:
        # Wide enough to show its roundness: cylinder shading, brighter on the side facing the light.
        shade = (
            0.8
            + 0.2 * np.sqrt(np.clip(1 - across**2, 0, 1))
            + 0.12 * np.clip(lit_side, 0, 1) * (1 - np.abs(across))
        )
    else:
        shade = np.ones_like(across)
    strand = np.clip(colour[None, None, :] * shade[..., None], 0, 255)
    shadow = ndi.shift(alpha, (-light[1] * w, -light[0] * w), order=1, mode="constant")
    shadow = ndi.gaussian_filter(shadow, max(0.6, w / 2)) * sub.fg_soft
    out = change_luminance(sub.image, np.clip(shadow - alpha, 0, 1) * 0.5, -0.18 * delta)
    out = composite(out, strand, alpha * 0.95)
    return out, {"colour_rgb": [int(v) for v in colour], "opacity": 0.95}


def _stroke(
    sub: Canvas,
    spec: DefectSpec,
    rng: np.random.Generator,
    field: PathField,
    half: np.ndarray,
    cover: np.ndarray,
    strength: np.ndarray,
    delta: float,
    luma: float,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A smeared stroke: streaky opacity across the width, fading along the drag direction."""
    across = np.clip(field.side / np.maximum(half, 0.5), -1, 1)
    k = np.linspace(-1, 1, 16)
    streak = np.interp(across, k, np.clip(0.85 + 0.15 * rng.normal(0, 1, 16), 0.55, 1.0))
    drag = 1.0 - 0.35 * np.clip(field.t, 0, 1) ** 1.5
    noise = smooth_noise(sub.shape, 1.0, rng)
    alpha = np.clip(cover * strength * streak * drag * (1 + 0.08 * noise), 0, 1)
    out, ci = surface_change(sub.image, alpha, spec, delta * 1.1, luma)
    ci["smear"] = True
    return out, alpha.astype(np.float32), ci

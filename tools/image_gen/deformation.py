"""Deformation defects: bent, squeeze, fold, misplaced, flip — the product's own pixels, moved and re-lit.

Why geometry and light together: a deformed product shows its own texture displaced, and, above all, a
surface that now faces the light differently. A warp alone reads as a smudge; what makes a bent tab read
as bent is that it turned brighter or darker as a whole, with a crease where it turns, and that its
silhouette changed. So each shape builds a height field (the new surface) and a displacement field (where
its pixels came from), resamples the image through the displacement and shades it from the height field
with the request's single light direction:

* bent, at the outline (a tab, a pin, a rim): a flap beyond a crease line tilts out of the plane; seen
  from above it is foreshortened, so the outline recedes and the background shows where it was, and the
  flap turns lighter or darker as a whole. Away from the outline: a kinked ridge across the surface.
* squeeze, at the outline: the outline is pinched inwards with the surface compressed behind it and
  shaded as a dip; away from it, a pinched bowl that pulls the texture towards its centre.
* fold: one straight crease with a lit and a shaded facet (a tent profile): a single sharp line where
  light turns to shadow, not a double line.
* misplaced / flip: a piece of the product shifted or mirrored as a block, with a thin seam.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools.image_gen.blending import CONTRAST_DELTA, Stamp, change_luminance, luminance, texture_contrast
from tools.image_gen.hole import apply_shading, shade_from_height
from tools.image_gen.missing import background_fill
from tools.image_gen.placement import Canvas, sample_centre
from tools.image_gen.shapes import blob_field, coords, edge_alpha
from tools.vocabulary import DefectSpec

#: Displacement amplitude relative to the radius, per contrast word.
_AMPLITUDE = {"low": 0.16, "medium": 0.24, "high": 0.34}
#: Tilt of a bent flap (radians) per contrast word: how much it turns towards or away from the light.
_TILT = {"low": 0.35, "medium": 0.5, "high": 0.7}
#: Shading ratio change of a tilted facet, per contrast word: the lit/shaded facets of a fold or bend.
_FACET = {"low": 0.16, "medium": 0.24, "high": 0.34}


def warp(image: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Resample `image` so that pixel p shows what was at p + (dx, dy) (bilinear, edges clamped)."""
    yy, xx = coords(image.shape[:2])
    cy, cx = yy + dy, xx + dx
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[2]):
        out[..., c] = ndi.map_coordinates(image[..., c], [cy, cx], order=1, mode="nearest")
    return out


def _outward_normal(depth: np.ndarray, x: float, y: float) -> tuple[float, float]:
    """Unit vector pointing out of the product at (x, y), from the gradient of the depth map."""
    sm = ndi.gaussian_filter(depth, 2.0)
    gy, gx = np.gradient(sm)
    h, w = depth.shape
    xi, yi = int(np.clip(round(x), 0, w - 1)), int(np.clip(round(y), 0, h - 1))
    nx, ny = -float(gx[yi, xi]), -float(gy[yi, xi])
    n = np.hypot(nx, ny)
    if n < 1e-6:
        return 1.0, 0.0
    return nx / n, ny / n


def _light_sign(light: tuple[float, float], nx: float, ny: float) -> float:
    """+1 when tilting the surface towards (nx, ny) turns it towards the light, else -1."""
    return 1.0 if nx * light[0] + ny * light[1] >= 0 else -1.0


def _boundary_centre(canvas: Canvas, radius: float, rng: np.random.Generator) -> tuple[float, float] | None:
    """A point on the product's outline in the allowed area (clear of earlier defects), or None."""
    if canvas.is_texture or (~canvas.foreground).sum() < 0.02 * canvas.foreground.size:
        return None
    edge = canvas.foreground & (canvas.depth <= 1.5)
    if canvas.occupied.any():
        edge &= ndi.distance_transform_edt(~canvas.occupied) >= radius + 3
    h, w = canvas.shape
    m = int(min(radius * 0.8, 0.2 * min(h, w)))
    frame = np.zeros_like(edge)
    frame[m : h - m, m : w - m] = True
    near = edge & ndi.binary_dilation(canvas.allowed, iterations=2)
    for cand in (near & frame, near):
        ys, xs = np.nonzero(cand)
        if ys.size:
            i = int(rng.integers(0, ys.size))
            return float(xs[i]), float(ys[i])
    return None


def render_deformation(canvas: Canvas, spec: DefectSpec, rng: np.random.Generator) -> Stamp:
    """Deform a patch of the product.

    Args:
        canvas: Where it may go, with the request's light direction.
        spec: Shape (bent / squeeze / fold / misplaced / flip), size, contrast (how far it moves and
            turns), softness.
        rng: Source of randomness.

    Returns:
        A `Stamp`; alpha covers the part of the product that moved or turned (and, at the outline, the
        strip it left).
    """
    shape = spec.shape if spec.shape in ("bent", "squeeze", "fold", "misplaced", "flip") else "bent"
    # A moved or turned block keeps its pixels' own edges, so it may be as small as a speck; a bend or a
    # pinch is seen through its shading, which spreads over a couple of pixels.
    radius = max(1.0 if shape in ("misplaced", "flip") else 2.0, canvas.extent(spec.size, rng) / 2.0 * 1.2)
    at_outline = None
    if shape in ("bent", "squeeze"):
        # Bent and squeezed parts are most often at the outline (a tab, an end, a pin); go there when the
        # allowed area touches it.
        allowed_edge = canvas.allowed & (canvas.depth <= max(2.0, 0.5 * radius))
        if allowed_edge.any() and (canvas.allowed & (canvas.depth > radius)).sum() < 4 * allowed_edge.sum():
            at_outline = _boundary_centre(canvas, radius, rng)
    if at_outline is not None:
        return _at_outline(canvas, spec, shape, radius, at_outline, rng)
    full_centre = sample_centre(canvas, radius, rng)
    box = canvas.around(full_centre, 1.7 * radius + 4)
    sub = canvas.crop(box)
    cx, cy = full_centre[0] - sub.origin[0], full_centre[1] - sub.origin[1]
    yy, xx = coords(sub.shape)
    px, py = xx - cx, yy - cy
    amp = _AMPLITUDE[spec.contrast] * radius
    theta = float(rng.uniform(0, 2 * np.pi))
    ex, ey = np.cos(theta), np.sin(theta)
    keep = np.clip(sub.depth / (0.15 * radius + 2.0), 0, 1)
    outline = blob_field(sub.shape, (cx, cy), radius, rng, irregularity=0.12, harmonics=4,
                         aspect=float(rng.uniform(0.7, 1.0)), angle=theta)
    soft = max(1.0, 0.3 * radius) if spec.softness == "soft" else max(1.0, 0.18 * radius)
    bump = edge_alpha(outline, soft) * keep
    img = sub.image
    info: dict[str, Any] = {
        "kind": shape,
        "mode": "surface",
        "centre": [round(full_centre[0], 1), round(full_centre[1], 1)],
        "radius_px": round(radius, 1),
        "amplitude_px": round(amp, 1),
        "direction_deg": round(float(np.rad2deg(theta)) % 360, 1),
        "contrast": spec.contrast,
    }
    delta = CONTRAST_DELTA[spec.contrast]
    if shape in ("misplaced", "flip"):
        if shape == "misplaced":
            amp = max(3.0, {"low": 0.35, "medium": 0.5, "high": 0.7}[spec.contrast] * radius)
            info["amplitude_px"] = round(amp, 1)
            dx = np.full(sub.shape, amp * ex, np.float32)
            dy = np.full(sub.shape, amp * ey, np.float32)
        else:
            u = px * ex + py * ey
            dx, dy = -2 * u * ex, -2 * u * ey
        moved = warp(img, dx.astype(np.float32), dy.astype(np.float32))
        # Only product moves onto product: where the shifted piece would bring background in, keep the original.
        moved_fg = warp(sub.foreground.astype(np.float32)[..., None], dx.astype(np.float32), dy.astype(np.float32))[..., 0]
        seam = edge_alpha(outline, 0.6 if spec.softness == "sharp" else max(1.0, 0.08 * radius)) * keep * sub.fg_soft
        seam = seam * np.clip(moved_fg, 0, 1)
        out = img + (moved - img) * seam[..., None]
        ring = np.exp(-((outline / max(0.7, 0.03 * radius)) ** 2)) * keep * sub.fg_soft
        out = change_luminance(out, ring, -0.5 * delta)
        alpha = np.maximum(seam, ring * 0.6)
        return Stamp(image=np.clip(out, 0, 255).astype(np.float32), alpha=alpha.astype(np.float32), box=box, info=info)

    facet = _FACET[spec.contrast]
    # On a busy surface a shallow facet hides in the pattern: turn it at least as far as the surface's
    # own spread (relative to its brightness).
    luma_in = float(luminance(img)[bump >= 0.5].mean()) if (bump >= 0.5).any() else 128.0
    facet = min(0.6, max(facet, 1.2 * texture_contrast(img, bump) / max(luma_in, 20.0)))
    info["facet"] = round(facet, 3)
    nx, ny = -ey, ex
    u = px * nx + py * ny  # across the crease
    v = px * ex + py * ey  # along it
    if shape == "fold":
        # A tent: two facets meeting in one crease; width of each facet about half the radius.
        width = max(2.0, 0.5 * radius)
        tent = np.clip(1.0 - np.abs(u) / width, 0, 1)
        height = amp * tent * bump
        # The material on either side is pulled towards the crease (it went into the fold).
        pull = np.clip(u / width, -1, 1) * (1 - np.clip(np.abs(u) / width, 0, 1) * 0.5) * bump
        dx, dy = 0.35 * amp * nx * pull, 0.35 * amp * ny * pull
        core = tent * bump
    elif shape == "bent":
        # A kinked ridge: a long gentle slope on one side of the crease, a short steep one on the other;
        # the crease itself bows a little.
        bow = 0.15 * radius * (v / max(radius, 1.0)) ** 2
        uu = u - bow
        long_w, short_w = max(2.0, 0.8 * radius), max(1.5, 0.3 * radius)
        prof = np.where(uu >= 0, np.clip(1 - uu / long_w, 0, 1), np.clip(1 + uu / short_w, 0, 1))
        height = amp * prof * bump
        dx, dy = 0.3 * amp * nx * prof * bump, 0.3 * amp * ny * prof * bump
        core = prof * bump
    else:  # squeeze: a pinched bowl pulling the texture towards its centre
        r2 = (px**2 + py**2) / max((0.6 * radius) ** 2, 1.0)
        prof = np.exp(-r2) * bump
        dx = 0.45 * px * prof
        dy = 0.45 * py * prof
        height = -0.8 * amp * prof
        core = prof
    moved = warp(img, dx.astype(np.float32), dy.astype(np.float32))
    ratio = shade_from_height(ndi.gaussian_filter(height, 0.7), sub.light)
    # Exaggerate the facet contrast to the contrast word's strength (a shallow fold still shows).
    ratio = 1.0 + np.clip(ratio - 1.0, -1, 1) * (facet / max(float(np.abs(ratio - 1.0).max()), 1e-3)) * bump
    out = apply_shading(moved, 1.0 + (ratio - 1.0) * sub.fg_soft)
    if shape == "fold":
        luma = float(luminance(img)[bump >= 0.5].mean()) if (bump >= 0.5).any() else 128.0
        crease = np.exp(-((u / max(0.6, 0.04 * radius)) ** 2)) * bump
        out = change_luminance(out, crease, -0.35 * delta if luma > 40 else 0.35 * delta)
    shaded = np.abs(ratio - 1.0) / max(facet, 1e-3)
    alpha = np.clip(np.maximum(np.maximum(shaded, core) * bump, np.clip(np.hypot(dx, dy), 0, 1)), 0, 1) * sub.fg_soft
    return Stamp(image=np.clip(out, 0, 255).astype(np.float32), alpha=alpha.astype(np.float32), box=box, info=info)


def _at_outline(
    canvas: Canvas, spec: DefectSpec, shape: str, radius: float, point: tuple[float, float], rng: np.random.Generator
) -> Stamp:
    """Bend a flap of the outline out of the plane, or pinch the outline inwards."""
    box = canvas.around(point, 1.8 * radius + 6)
    sub = canvas.crop(box)
    px0, py0 = point[0] - sub.origin[0], point[1] - sub.origin[1]
    nx, ny = _outward_normal(sub.depth, px0, py0)
    tx, ty = -ny, nx
    yy, xx = coords(sub.shape)
    rx, ry = xx - px0, yy - py0
    s = rx * nx + ry * ny  # along the outward normal (0 at the outline point, negative inside)
    t = rx * tx + ry * ty  # along the outline
    img = sub.image
    fg = sub.foreground
    delta = CONTRAST_DELTA[spec.contrast]
    half = radius * float(rng.uniform(0.8, 1.1))  # half-width of the flap along the outline
    across = np.clip(1.0 - (np.abs(t) / half) ** 4, 0, 1)  # flat-topped window along the outline
    info: dict[str, Any] = {
        "kind": shape,
        "mode": "outline",
        "centre": [round(point[0], 1), round(point[1], 1)],
        "radius_px": round(radius, 1),
        "normal_xy": [round(nx, 3), round(ny, 3)],
        "contrast": spec.contrast,
    }
    if shape == "bent":
        crease = -radius * float(rng.uniform(0.9, 1.3))  # crease line inside the outline
        tilt = _TILT[spec.contrast]
        # The flap turns as a whole: away from the light on a bright product (darker), towards it on a
        # dark one (brighter); its silhouette stays (a flange bent up or down is seen nearly edge-on
        # from above, so the outline moves by well under a pixel), with a crease line where it turns.
        beyond = np.clip((s - crease) / max(1.0, 0.08 * radius), 0, 1) * across
        flap = beyond * fg
        moved, moved_fg = img, fg.astype(np.float32)
        luma = float(luminance(img)[flap >= 0.5].mean()) if (flap >= 0.5).any() else 128.0
        amount = _FACET[spec.contrast] * 1.4
        sign = 1.0 if luma < 110 else -1.0
        gradient = 0.75 + 0.5 * np.clip((s - crease) / max(-crease, 1.0), 0, 1)  # stronger towards the tip
        if sign > 0:
            shaded = img + (255.0 - img) * np.clip(amount * flap * gradient, 0, 0.9)[..., None]
        else:
            shaded = img * (1.0 - np.clip(amount * flap * gradient, 0, 0.9))[..., None]
        creaseline = np.exp(-(((s - crease) / max(0.8, 0.05 * radius)) ** 2)) * across * fg
        shaded = change_luminance(shaded, creaseline * 0.8, (0.5 if sign > 0 else -0.4) * delta)
        info.update(tilt_rad=round(tilt, 2), crease_px=round(-crease, 1), lit=bool(sign > 0))
        body = np.maximum(flap, creaseline * 0.8)
    else:  # squeeze: the outline pinched inwards, the surface behind it compressed and dipping
        depth_in = radius * float(rng.uniform(0.9, 1.3))
        push = _AMPLITUDE[spec.contrast] * radius * 1.3
        fall = np.exp(-((np.minimum(s, 0) / depth_in) ** 2)) * across
        dx, dy = push * nx * fall, push * ny * fall
        moved = warp(img, dx.astype(np.float32), dy.astype(np.float32))
        moved_fg = warp(fg.astype(np.float32)[..., None], dx.astype(np.float32), dy.astype(np.float32))[..., 0]
        height = -0.6 * push * fall * moved_fg
        ratio = shade_from_height(ndi.gaussian_filter(height, 0.8), sub.light)
        ratio = 1.0 + np.clip(ratio - 1.0, -1, 1) * (_FACET[spec.contrast] / max(float(np.abs(ratio - 1.0).max()), 1e-3))
        shaded = apply_shading(moved, 1.0 + (ratio - 1.0) * moved_fg)
        shaded = shaded * (1.0 - 0.12 * fall * moved_fg)[..., None]
        info.update(push_px=round(push, 1))
        body = np.clip(fall * 1.6, 0, 1) * moved_fg
    # Where the product receded, the background shows: re-synthesise it from the nearby background.
    background = ~ndi.binary_dilation(fg, iterations=2)
    gone = np.clip(fg.astype(np.float32) - moved_fg, 0, 1)
    if background.sum() >= 8 and gone.max() > 0:
        fill = background_fill(img, background, max(2.0, radius / 2))
        shaded = shaded * (1 - gone[..., None]) + fill * gone[..., None]
    # Soft coverage: the flap fades in over a pixel at its sides.
    out = img + (shaded - img) * np.clip(np.maximum(body, gone) * 1.0 + 0.0, 0, 1)[..., None]
    alpha = np.clip(np.maximum(body, gone), 0, 1) * np.maximum(fg, gone > 0)
    info["receded_px"] = int((gone >= 0.5).sum())
    return Stamp(
        image=np.clip(out, 0, 255).astype(np.float32),
        alpha=alpha.astype(np.float32),
        box=box,
        info=info,
    )

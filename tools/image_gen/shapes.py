"""Geometry for defects: irregular blobs, random paths and their anti-aliased distance fields.

Why: real defects are never perfect circles or straight lines. Blobs get their outline from a random
radial function (a few low harmonics) plus smoothed noise; paths come from a random walk on the heading
angle, smoothed for scratches and hairs, left jagged for cracks. Every shape is returned as a *field*
(signed or unsigned distance in pixels), not a binary mask, so that edges can be blurred to any
softness and stay anti-aliased at 1 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.special import erf


def smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise normalised to zero mean and unit standard deviation.

    Args:
        shape: (H, W).
        sigma: Correlation length in pixels; larger gives broader, smoother variation.
        rng: Source of randomness.

    Returns:
        float32 (H, W).
    """
    sigma = max(sigma, 0.3)
    if sigma > 4.0:
        # Broad noise: draw it on a coarse grid and interpolate up; same look, a fraction of the cost.
        f = sigma / 2.0
        small = (max(2, int(np.ceil(shape[0] / f)) + 1), max(2, int(np.ceil(shape[1] / f)) + 1))
        coarse = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma=2.0, mode="wrap")
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32) / np.float32(f)
        noise = ndi.map_coordinates(coarse, [yy, xx], order=1)
    else:
        noise = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma, mode="wrap")
    std = float(noise.std())
    return (noise - noise.mean()) / (std if std > 1e-8 else 1.0)


def fractal_noise(
    shape: tuple[int, int], scale: float, rng: np.random.Generator, *, octaves: int = 4, persistence: float = 0.55
) -> np.ndarray:
    """Fractal (fBm) noise: octaves of smoothed noise, each half the scale and `persistence` times the
    amplitude of the one before, normalised to zero mean and unit standard deviation.

    Why: natural outlines and interiors (a torn edge, a stain's mottling, corrosion) vary at every scale;
    one smooth octave gives the blobby look of a rendered shape.

    Args:
        shape: (H, W).
        scale: Correlation length of the coarsest octave in pixels.
        rng: Source of randomness.
        octaves: How many octaves (the finest is scale / 2**(octaves-1), at least 0.5 px).
        persistence: Amplitude ratio between successive octaves (higher: rougher).

    Returns:
        float32 (H, W).
    """
    total = np.zeros(shape, np.float32)
    amp = 1.0
    for k in range(max(1, octaves)):
        sigma = max(scale / 2**k, 0.5)
        total += amp * smooth_noise(shape, sigma, rng)
        amp *= persistence
        if sigma <= 0.5:
            break
    std = float(total.std())
    return (total - total.mean()) / (std if std > 1e-8 else 1.0)


def edge_alpha(field: np.ndarray, sigma: float) -> np.ndarray:
    """Turn a signed distance (positive inside, pixels) into a soft coverage in [0, 1].

    Args:
        field: Signed distance to the outline.
        sigma: Edge blur in pixels; about 0.5 gives a crisp anti-aliased edge. Coverage is exactly 0.5
            on the outline for every sigma, so the defect's extent does not change with its softness.

    Returns:
        float32 coverage, same shape as `field`.
    """
    sigma = max(float(sigma), 0.35)
    return (0.5 * (1.0 + erf(field / (np.sqrt(2.0) * sigma)))).astype(np.float32)


def coords(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinate grids (yy, xx) as float32."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return yy, xx


def blob_field(
    shape: tuple[int, int],
    centre: tuple[float, float],
    radius: float,
    rng: np.random.Generator,
    *,
    irregularity: float = 0.18,
    harmonics: int = 6,
    aspect: float = 1.0,
    angle: float = 0.0,
    roughness: float = 0.0,
) -> np.ndarray:
    """Signed distance (px, positive inside) of an irregular blob.

    Args:
        shape: (H, W) of the image.
        centre: (x, y) of the blob centre.
        radius: Mean radius in pixels.
        rng: Source of randomness (harmonic amplitudes and phases, outline noise).
        irregularity: Amplitude of the low harmonics of the radius, relative to it; 0 gives an ellipse.
        harmonics: Highest harmonic; more gives a busier outline.
        aspect: Ratio of minor to major axis (≤ 1 elongates the blob).
        angle: Orientation of the major axis in radians.
        roughness: Amplitude of fractal outline noise relative to the radius (ragged, torn edges).

    Returns:
        float32 (H, W) approximate signed distance to the outline.
    """
    yy, xx = coords(shape)
    dx, dy = xx - centre[0], yy - centre[1]
    ca, sa = np.cos(angle), np.sin(angle)
    u = dx * ca + dy * sa
    v = (-dx * sa + dy * ca) / max(aspect, 0.05)
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    r = np.ones_like(rho)
    for k in range(2, max(2, harmonics) + 1):
        amp = irregularity * rng.normal() / k**1.1
        r += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.45, 1.8) * radius
    # (r - rho) is measured in major-axis units; rescale by the local axis length so that the edge
    # width (in image pixels) is the same all around an elongated blob.
    a = max(aspect, 0.05)
    field = (r - rho) * np.sqrt(np.cos(theta) ** 2 + (a * np.sin(theta)) ** 2)
    if roughness > 0:
        field = field + roughness * radius * fractal_noise(shape, max(radius / 4.0, 0.8), rng, octaves=4)
    return field.astype(np.float32)


def random_path(
    start: tuple[float, float],
    heading: float,
    length: float,
    rng: np.random.Generator,
    *,
    step: float = 2.0,
    turn: float = 0.05,
    smooth: float = 3.0,
    bend: float = 0.0,
    pull: float = 0.0,
) -> np.ndarray:
    """Points of a random path from `start`, as an (N, 2) array of (x, y).

    Args:
        start: First point (x, y).
        heading: Initial direction in radians (image coordinates, y down).
        length: Path length in pixels.
        rng: Source of randomness.
        step: Distance between points in pixels.
        turn: Standard deviation of the heading change per step (radians).
        smooth: Gaussian smoothing of the heading changes, in steps; 0 keeps a jagged crack-like path.
        bend: Constant curvature added per step (radians); gives the gentle arc of a scratch.
        pull: Strength (0..1) pulling the heading back to the initial one; keeps cracks going somewhere.

    Returns:
        float32 (N, 2) points.
    """
    n = max(2, int(np.ceil(length / step)) + 1)
    dtheta = rng.normal(0.0, turn, n - 1)
    if smooth > 0:
        dtheta = ndi.gaussian_filter1d(dtheta, smooth, mode="nearest") * np.sqrt(smooth * 2.5)
    heading_seq = np.empty(n - 1)
    h = heading
    for i in range(n - 1):
        h = h + dtheta[i] + bend - pull * (h - heading)
        heading_seq[i] = h
    seg = length / (n - 1)
    steps = np.stack([np.cos(heading_seq), np.sin(heading_seq)], axis=1) * seg
    pts = np.vstack([[start], start + np.cumsum(steps, axis=0)])
    return pts.astype(np.float32)


def centred_path(
    centre: tuple[float, float], heading: float, length: float, rng: np.random.Generator, **kw
) -> np.ndarray:
    """A `random_path` shifted so that its midpoint (by index) sits on `centre`."""
    pts = random_path((0.0, 0.0), heading, length, rng, **kw)
    mid = pts[len(pts) // 2]
    return (pts - mid + np.asarray(centre, np.float32)).astype(np.float32)


@dataclass
class PathField:
    """Distance field of a polyline inside a window of the image.

    Attributes:
        dist: Unsigned distance (px) from each pixel to the polyline; large outside the window.
        t: Arc-length position (0..1) of the nearest point on the polyline.
        side: Signed offset across the line (px, positive to the left of the travel direction).
        normal: Unit normal (nx, ny) at the nearest point, as two (H, W) arrays.
    """

    dist: np.ndarray
    t: np.ndarray
    side: np.ndarray
    normal: tuple[np.ndarray, np.ndarray]


def path_field(points: np.ndarray, shape: tuple[int, int], margin: float) -> PathField:
    """Exact point-to-polyline distance (sub-pixel, for anti-aliasing) around a path.

    Args:
        points: (N, 2) polyline vertices (x, y).
        shape: (H, W) of the image.
        margin: Pixels around each segment where the field is computed; beyond it `dist` stays large.
            Must cover the widest effect (line width plus blur plus shadow offset).

    Returns:
        A `PathField`.
    """
    h, w = shape
    big = np.float32(1e6)
    dist = np.full(shape, big, np.float32)
    tpar = np.zeros(shape, np.float32)
    side = np.zeros(shape, np.float32)
    nx = np.zeros(shape, np.float32)
    ny = np.zeros(shape, np.float32)
    pts = np.asarray(points, np.float64)
    seglen = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seglen)])
    total = max(cum[-1], 1e-6)
    for i in range(len(pts) - 1):
        a, b = pts[i], pts[i + 1]
        x0 = int(max(0, np.floor(min(a[0], b[0]) - margin)))
        x1 = int(min(w, np.ceil(max(a[0], b[0]) + margin) + 1))
        y0 = int(max(0, np.floor(min(a[1], b[1]) - margin)))
        y1 = int(min(h, np.ceil(max(a[1], b[1]) + margin) + 1))
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        d = b - a
        L2 = max(float(d @ d), 1e-12)
        u = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / L2, 0.0, 1.0)
        px, py = a[0] + u * d[0], a[1] + u * d[1]
        dd = np.hypot(xx - px, yy - py)
        better = dd < dist[y0:y1, x0:x1]
        if not better.any():
            continue
        ln = np.sqrt(L2)
        cross = (d[0] * (yy - a[1]) - d[1] * (xx - a[0])) / ln
        dist[y0:y1, x0:x1][better] = dd[better]
        tpar[y0:y1, x0:x1][better] = ((cum[i] + u * seglen[i]) / total)[better]
        side[y0:y1, x0:x1][better] = cross[better]
        nx[y0:y1, x0:x1][better] = -d[1] / ln
        ny[y0:y1, x0:x1][better] = d[0] / ln
    return PathField(dist=dist, t=tpar, side=side, normal=(nx, ny))


def path_length(points: np.ndarray) -> float:
    """Total length of a polyline in pixels."""
    return float(np.linalg.norm(np.diff(np.asarray(points, np.float64), axis=0), axis=1).sum())

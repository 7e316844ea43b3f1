"""Camera consistency: the defect keeps the input's own sensor noise, sharpness and compression.

Why: a detector learns whatever separates our anomalies from normals. A defect drawn noise-free, sharper
than the lens, or without the JPEG blocking of the rest of the frame is a cue real defects lack, so a
detector trained on it learns the cue and not the defect. The engine therefore

* splits the input into a low-pass layer and its high-pass detail (`split_detail`): defects are drawn on
  the low-pass layer and the input's *own* detail (its noise, grain and block edges) is added back
  everywhere, inside the defect included, so the defect region carries the image's noise by construction;
* blurs every rendered change to the input's estimated sharpness (`estimate_blur`);
* when the input was a JPEG (quality read from its quantization tables, `jpeg_settings`), re-encodes the
  blocks the defect touched at the same quality and subsampling (`recompress_blocks`), so they carry the
  same blocking as their neighbours while every untouched block stays bit-identical.

The same module measures the result (`residual_ratio`, `blockiness_ratio`): `anomaly-agent bench camera`
and the tests use them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, JpegImagePlugin
from scipy import ndimage as ndi

#: Gaussian sigma (px) separating the low-pass layer defects are drawn on from the detail added back.
DETAIL_SIGMA = 1.0
#: Sharpness the renderers already have (their anti-aliased edges), px; camera blur is added on top of it.
RENDER_SIGMA = 0.5

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

#: The IJG standard luminance quantization table (quality 50), in natural (row-major) order.
_IJG_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    np.float64,
)


@dataclass(frozen=True)
class JpegSettings:
    """How an input JPEG was compressed: IJG-equivalent quality 1..100 and PIL's subsampling code
    (0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0)."""

    quality: int
    subsampling: int = 2

    @property
    def block(self) -> int:
        """Side of the MCU in pixels: the unit the encoder treats independently."""
        return 16 if self.subsampling in (1, 2) else 8


def luminance(image: np.ndarray) -> np.ndarray:
    """Rec. 601 luma, float32 (H, W)."""
    return (np.asarray(image, np.float32) @ _LUMA).astype(np.float32)


def split_detail(image: np.ndarray, sigma: float = DETAIL_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """(low-pass layer, high-pass detail) of an RGB image, float32; their sum is the image."""
    img = np.asarray(image, np.float32)
    low = ndi.gaussian_filter(img, (sigma, sigma, 0), mode="reflect")
    return low, img - low


def estimate_noise(image: np.ndarray) -> float:
    """Sensor noise standard deviation of the luma in levels: Donoho's estimator, the median absolute
    finest diagonal (Haar HH) wavelet coefficient over 0.6745 (see `noise_map`)."""
    return _noise_sigma(noise_map(image))


def estimate_blur(image: np.ndarray) -> float:
    """Gaussian sigma (px) of the optics' blur, from how much the strongest edges lose under a known blur.

    A step edge blurred by sigma s has a peak gradient proportional to 1/s; blurring it by 1 px more
    lowers the peak by s/sqrt(s²+1). The 99.5th percentile of gradient magnitudes stands for the peak
    (robust to a few noisy pixels); the estimate is clipped to 0.4..3 px.
    """
    gray = luminance(image)
    denoised = ndi.gaussian_filter(gray, 0.5)  # keep pixel noise from posing as edges
    g0 = np.hypot(ndi.sobel(denoised, 0), ndi.sobel(denoised, 1))
    blurred = ndi.gaussian_filter(gray, np.sqrt(0.5**2 + 1.0))
    g1 = np.hypot(ndi.sobel(blurred, 0), ndi.sobel(blurred, 1))
    p0, p1 = float(np.percentile(g0, 99.5)), float(np.percentile(g1, 99.5))
    if p0 <= 1e-6:
        return 0.4
    rho = min(p1 / p0, 0.995)
    s = rho / np.sqrt(1.0 - rho * rho)  # blur of the denoised image, which includes the 0.5 px we added
    return float(np.clip(np.sqrt(max(s * s - 0.25, 0.0)), 0.4, 3.0))


def blur_change(change: np.ndarray, sigma: float) -> np.ndarray:
    """A rendered change (float, (h, w) or (h, w, 3)) blurred by `sigma` px (0 leaves it as it is)."""
    if sigma <= 0.05:
        return change
    s = (sigma, sigma, 0) if change.ndim == 3 else sigma
    return ndi.gaussian_filter(change, s, mode="constant")


def _quality_from_table(table: np.ndarray) -> int:
    """The IJG quality whose scaled standard table is closest to `table` (64 luminance entries)."""
    best, best_err = 75, np.inf
    for q in range(1, 101):
        scale = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
        std = np.clip(np.floor((_IJG_LUMA * scale + 50.0) / 100.0), 1, 255)
        err = float(np.abs(np.sort(std) - np.sort(table)).mean())
        if err < best_err:
            best, best_err = q, err
    return best


def jpeg_settings(source: object) -> JpegSettings | None:
    """The JPEG quality and subsampling of an image source (path, bytes or data URL); None when the source
    is not a JPEG or cannot be read (the loader reports unreadable inputs; this only describes them).

    Why from the quantization tables: they are what the encoder used; the quality is recovered as the IJG
    quality whose standard table they match (exact for files written by libjpeg/PIL, the closest for others).
    """
    from tools.imaging import ImageInputError, _resolve_source

    try:
        fp, _ = _resolve_source(source)  # type: ignore[arg-type]
        with Image.open(fp) as im:
            if im.format != "JPEG" or not getattr(im, "quantization", None):
                return None
            table = np.asarray(im.quantization[0], np.float64)
            sampling = JpegImagePlugin.get_sampling(im)
    except (ImageInputError, OSError, ValueError):
        return None
    return JpegSettings(quality=_quality_from_table(table), subsampling=sampling if sampling in (0, 1, 2) else 2)


def jpeg_roundtrip(image: np.ndarray, settings: JpegSettings) -> np.ndarray:
    """`image` (uint8 RGB) encoded as JPEG with `settings` and decoded again."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(settings.quality), subsampling=settings.subsampling)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def recompress_blocks(edited: np.ndarray, changed: np.ndarray, settings: JpegSettings) -> np.ndarray:
    """`edited` with every MCU that `changed` touches replaced by its JPEG round trip at `settings`.

    Why only those blocks: an untouched block of a decoded JPEG already carries the input's compression;
    re-encoding it would change pixels outside the defect for no reason. Blocks are aligned to the image
    origin, as the encoder's are.

    Args:
        edited: uint8 RGB, the engine's output.
        changed: bool (H, W), the pixels the defect changed (at any level).
        settings: The input's JPEG settings.

    Returns:
        uint8 RGB, same shape.
    """
    if not changed.any():
        return edited
    b = settings.block
    h, w = changed.shape
    hb, wb = -(-h // b), -(-w // b)
    padded = np.zeros((hb * b, wb * b), bool)
    padded[:h, :w] = changed
    touched = padded.reshape(hb, b, wb, b).any(axis=(1, 3))
    touched = ndi.binary_dilation(touched)  # chroma upsampling reaches one block into the neighbours
    block_mask = np.repeat(np.repeat(touched, b, axis=0), b, axis=1)[:h, :w]
    out = edited.copy()
    out[block_mask] = jpeg_roundtrip(edited, settings)[block_mask]
    return out


def ring(mask: np.ndarray, width: int | None = None, gap: int = 2) -> np.ndarray:
    """A band just outside `mask`: `gap` px away, about as many pixels as the mask (3..12 px wide)."""
    if width is None:
        width = int(np.clip(np.sqrt(mask.sum()) / 3.0, 3, 12))
    outer = ndi.binary_dilation(mask, iterations=gap + width)
    return outer & ~ndi.binary_dilation(mask, iterations=gap)


def noise_map(image: np.ndarray) -> np.ndarray:
    """The finest diagonal (Haar HH) detail of the luma at every pixel, (H, W) (last row/column repeated).

    Why this band: it is the one Donoho's noise estimator reads. Smooth shading, ramps and horizontal or
    vertical edges leave it at zero, so what it holds is the pixel-scale grain a camera adds.
    """
    g = luminance(image)
    hh = (g[:-1, :-1] - g[:-1, 1:] - g[1:, :-1] + g[1:, 1:]) / 2.0
    return np.pad(hh, ((0, 1), (0, 1)), mode="edge")


def _noise_sigma(values: np.ndarray) -> float:
    return float(np.median(np.abs(values))) / 0.6745


def residual_ratio(image: np.ndarray, mask: np.ndarray) -> float | None:
    """Sensor-noise level inside `mask` over a ring just outside it; None when either side has fewer
    than 16 measurable pixels or the ring has no noise at all.

    The high-pass residual is the finest diagonal wavelet band (`noise_map`), its spread the robust MAD
    estimate: 1.0 means the defect carries the surrounding noise; a flat or denoised interior gives well
    below 1, pasted foreign noise above. As noise estimators do, pixels on structure are left out: inside
    the mask only pixels whose local gradient and curvature (of the 1-px smoothed luma) are no stronger
    than the ring's 90th percentiles are measured, so a defect's own outline or a thin line's profile
    does not pose as noise (a defect that is all structure is not measured).
    """
    mask = np.asarray(mask, bool)
    band = ring(mask)
    if mask.sum() < 16 or band.sum() < 16:
        return None
    g = ndi.gaussian_filter(luminance(image), 1.0)
    grad = np.hypot(ndi.sobel(g, 0), ndi.sobel(g, 1))
    curv = np.abs(ndi.laplace(g))
    flat = (grad <= np.percentile(grad[band], 90)) & (curv <= np.percentile(curv[band], 90))
    inside = mask & flat
    if inside.sum() < 16:
        return None
    hh = noise_map(image)
    outside = _noise_sigma(hh[band & flat])
    if outside <= 1e-6:
        return None
    return _noise_sigma(hh[inside]) / outside


def highpass_ratio(image: np.ndarray, mask: np.ndarray, sigma: float = DETAIL_SIGMA) -> float | None:
    """Robust (MAD) spread of the Gaussian high-pass residual (luma minus its `sigma` blur) inside `mask`
    over the ring; None as in `residual_ratio`. Unlike the wavelet band, this residual also holds a
    defect's own fine structure (thin lines, sharp outlines), so it reads above 1 on strong thin defects
    even when their noise matches."""
    mask = np.asarray(mask, bool)
    band = ring(mask)
    if mask.sum() < 16 or band.sum() < 16:
        return None
    g = luminance(image)
    resid = g - ndi.gaussian_filter(g, sigma)

    def spread(v: np.ndarray) -> float:
        return 1.4826 * float(np.median(np.abs(v - np.median(v))))

    outside = spread(resid[band])
    return None if outside <= 1e-6 else spread(resid[mask]) / outside


def blockiness_ratio(image: np.ndarray, mask: np.ndarray, block: int = 8) -> float | None:
    """JPEG blocking inside `mask` over a ring around it; None when either side crosses too few block edges.

    Blocking is the mean absolute luma step across 8-px block boundaries divided by the mean step between
    the pixels next to them (1 for an image without block artefacts, above 1 with them).
    """
    mask = np.asarray(mask, bool)
    region = ndi.binary_dilation(mask, iterations=2)
    band = ring(mask, width=max(6, int(np.sqrt(mask.sum()) / 2)))
    gray = luminance(image)
    dx = np.abs(np.diff(gray, axis=1))  # step between column j and j+1
    dy = np.abs(np.diff(gray, axis=0))
    cols = np.arange(dx.shape[1])
    rows = np.arange(dy.shape[0])
    across_x = ((cols + 1) % block == 0)[None, :]
    near_x = (((cols + 1) % block == 1) | ((cols + 1) % block == block - 1))[None, :]
    across_y = ((rows + 1) % block == 0)[:, None]
    near_y = (((rows + 1) % block == 1) | ((rows + 1) % block == block - 1))[:, None]

    def score(area: np.ndarray) -> float | None:
        ax, ay = area[:, :-1] & area[:, 1:], area[:-1, :] & area[1:, :]
        edge = np.concatenate([dx[ax & across_x], dy[ay & across_y]])
        near = np.concatenate([dx[ax & near_x], dy[ay & near_y]])
        if edge.size < 24 or near.size < 24:
            return None
        return float(edge.mean()) / max(float(near.mean()), 1e-3)

    inside, outside = score(region), score(band)
    if inside is None or outside is None or outside <= 1e-6:
        return None
    return inside / outside

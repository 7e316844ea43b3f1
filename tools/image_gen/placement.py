"""Where a defect may go: position words to areas, sizes to pixels, and centre sampling.

Why: the instruction says "top-left", "edge" or "anywhere"; the defect must then lie in that part of
the *product*, not of the frame, and never hang off the product onto the background. Positions are
read relative to the foreground's bounding box; centres are drawn where the product is deep enough
to hold the whole defect, and away from defects already drawn so that "two holes" are two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from tools.foreground import foreground_box, foreground_diameter

if TYPE_CHECKING:
    from tools.image_gen.appearance import Look


class NotApplicable(Exception):
    """Raised by a renderer that cannot draw its family on this image (e.g. "missing" on a texture);
    the engine then draws the closest family instead and says so in the result's info."""


#: Defect extent per size word, as a fraction of the foreground's equivalent diameter.
SIZE_EXTENT: dict[str, float] = {"tiny": 0.03, "small": 0.07, "medium": 0.14, "large": 0.25}

#: Largest defect extent as a fraction of the product's diameter (after the per-type multiplier).
MAX_EXTENT = 0.6

#: Named knowledge-base sub-regions that map onto a position word.
REGION_POSITIONS: dict[str, str] = {
    "rim": "edge",
    "edge": "edge",
    "border": "edge",
    "outer": "edge",
    "lip": "edge",
    "thread": "edge",
    "perimeter": "edge",
    "centre": "center",
    "center": "center",
    "middle": "center",
    "inner": "center",
    "interior": "center",
    "body": "center",
    "top": "top",
    "head": "top",
    "cap": "top",
    "bottom": "bottom",
    "base": "bottom",
    "left": "left",
    "right": "right",
}


def region_position(region: str | None) -> str | None:
    """The position word a named sub-region stands for, or None when it names no known part."""
    if not region:
        return None
    for word in region.lower().replace("-", " ").split():
        if word in REGION_POSITIONS:
            return REGION_POSITIONS[word]
    return None


def region_mask(foreground: np.ndarray, position: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """The part of the foreground that a position word allows.

    Args:
        foreground: Bool product mask (H, W).
        position: One of `tools.vocabulary.POSITIONS`. Quadrants and halves are taken inside the
            foreground's bounding box, shrunk slightly towards its corners so a defect centred there
            reads unambiguously as, e.g., "top-left"; "center" is the middle 40% of the box; "edge" is
            a band along the foreground boundary (for textures: along the frame); "anywhere" is all of it.
        rng: Optional; when given, the edge band's width is jittered (6–10% of the diameter) so that
            repeated edge defects do not all sit at the same depth.

    Returns:
        Bool mask (H, W) ⊆ foreground. Falls back to the whole foreground when the area is empty.
    """
    fg = np.asarray(foreground, bool)
    x0, y0, x1, y1 = foreground_box(fg)
    bw, bh = x1 - x0, y1 - y0
    yy, xx = np.mgrid[0 : fg.shape[0], 0 : fg.shape[1]]
    fx = (xx + 0.5 - x0) / max(bw, 1)  # 0..1 across the box
    fy = (yy + 0.5 - y0) / max(bh, 1)
    lo, hi = 0.45, 0.55
    areas = {
        "top-left": (fx < lo) & (fy < lo),
        "top-right": (fx > hi) & (fy < lo),
        "bottom-left": (fx < lo) & (fy > hi),
        "bottom-right": (fx > hi) & (fy > hi),
        "top": fy < 0.4,
        "bottom": fy > 0.6,
        "left": fx < 0.4,
        "right": fx > 0.6,
        "center": (np.abs(fx - 0.5) < 0.2) & (np.abs(fy - 0.5) < 0.2),
    }
    if position == "edge":
        width = foreground_diameter(fg) * (rng.uniform(0.06, 0.10) if rng is not None else 0.08)
        depth = ndi.distance_transform_edt(np.pad(fg, 1))[1:-1, 1:-1]
        area = fg & (depth <= max(width, 2.0))
    elif position in areas:
        area = fg & areas[position]
    else:
        area = fg.copy()
    return area if area.any() else fg.copy()


def region_area(
    foreground: np.ndarray, rule: str, rng: np.random.Generator | None = None, is_texture: bool = False
) -> np.ndarray:
    """The part of the foreground a sub-region placement rule (tools/image_gen/types.yaml) allows.

    Args:
        foreground: Bool product mask (H, W).
        rule: One of `tools.image_gen.params.RULES`.
        rng: Jitters the edge band's width, as in `region_mask`.
        is_texture: Textures have no ends or sides; those rules then allow the whole surface.

    Returns:
        Bool mask (H, W) ⊆ foreground; the whole foreground when the rule leaves nothing.
    """
    fg = np.asarray(foreground, bool)
    if rule in ("ends", "sides") and is_texture:
        rule = "anywhere"
    if rule in ("ends", "sides"):
        ys, xs = np.nonzero(fg)
        pts = np.stack([xs, ys], axis=1).astype(np.float64)
        mean = pts.mean(axis=0)
        _, _, vt = np.linalg.svd(pts - mean, full_matrices=False)
        t = (pts - mean) @ vt[0]
        lo, hi = t.min(), t.max()
        span = max(hi - lo, 1.0)
        ends = (t < lo + 0.22 * span) | (t > hi - 0.22 * span)
        area = np.zeros_like(fg)
        if rule == "ends":
            area[ys[ends], xs[ends]] = True
        else:
            band = region_mask(fg, "edge", rng)
            area[ys[~ends], xs[~ends]] = True
            area &= band
    elif rule == "interior":
        depth = ndi.distance_transform_edt(np.pad(fg, 1))[1:-1, 1:-1]
        area = fg & (depth >= 0.12 * foreground_diameter(fg) / 2)
    elif rule == "anywhere":
        area = fg.copy()
    else:
        area = region_mask(fg, rule, rng)
    return area if area.any() else fg.copy()


@dataclass
class Canvas:
    """Everything a family renderer needs to know about where it may draw.

    A renderer first draws a centre on the full canvas (`sample_centre`), then works on a small
    `crop` around it, so that cost grows with the defect, not with the image.

    Attributes:
        image: Current image, float32 RGB 0..255 (earlier defects of the same request included).
        foreground: Bool product mask.
        allowed: Bool area for defect centres (position word applied).
        occupied: Bool area taken by earlier defects of the same request.
        light: Unit vector (x, y) pointing towards the light, in image coordinates (y down); one per
            request so that every rim highlight and shadow agrees.
        diameter: Foreground equivalent diameter in pixels (of the whole product, also in a crop).
        depth: Distance (px) of each pixel to the nearest background pixel.
        fg_soft: Coverage clip, 1 inside the product falling to 0 within ~1 px outside it.
        origin: (x0, y0) of this canvas in the full image; (0, 0) unless it is a crop.
        is_texture: True for texture categories (the whole frame is product, there is no background).
        scale: Multiplier on every size word's extent (a per-type adjustment from types.yaml).
        look: The defect's sampled appearance (size, line width, outline raggedness); None keeps the size
            words' fixed extents.
    """

    image: np.ndarray
    foreground: np.ndarray
    allowed: np.ndarray
    occupied: np.ndarray
    light: tuple[float, float]
    diameter: float
    depth: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]
    fg_soft: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]
    origin: tuple[int, int] = (0, 0)
    is_texture: bool = False
    scale: float = 1.0
    look: Look | None = None

    def __post_init__(self) -> None:
        if self.depth is None:
            self.depth = foreground_depth(self.foreground)
        if self.fg_soft is None:
            self.fg_soft = np.clip(self.depth, 0.0, 1.0).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.foreground.shape  # type: ignore[return-value]

    def extent(self, size: str, rng: np.random.Generator) -> float:
        """Defect extent in pixels: the look's sampled extent (at least 1.5 px: a speck of a few pixels is
        a defect too), or without a look the size word's, jittered ±15%, at least 8 px."""
        jitter = rng.uniform(0.85, 1.15)  # drawn either way, so placement draws stay aligned
        if self.look is not None:
            return float(max(1.5, min(MAX_EXTENT, self.look.extent_frac * self.scale) * self.diameter))
        return float(max(8.0, SIZE_EXTENT.get(size, 0.14) * self.scale * self.diameter * jitter))

    @property
    def ragged(self) -> float:
        """Extra fractal outline amplitude (fraction of the radius) the look asks for; 0 without a look."""
        return self.look.ragged if self.look is not None else 0.0

    def window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        """Integer box (x0, y0, x1, y1), x1/y1 exclusive, covering the given extent, clipped to the canvas."""
        h, w = self.shape
        bx0, by0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        bx1, by1 = min(w, int(np.ceil(x1)) + 1), min(h, int(np.ceil(y1)) + 1)
        return bx0, by0, max(bx0 + 1, bx1), max(by0 + 1, by1)

    def around(self, centre: tuple[float, float], reach: float) -> tuple[int, int, int, int]:
        """Box of half-size `reach` around `centre`, clipped to the canvas."""
        return self.window(centre[0] - reach, centre[1] - reach, centre[0] + reach, centre[1] + reach)

    def crop(self, box: tuple[int, int, int, int]) -> Canvas:
        """The canvas restricted to `box` (views, not copies); coordinates become local to the box."""
        x0, y0, x1, y1 = box
        sl = (slice(y0, y1), slice(x0, x1))
        return Canvas(
            image=self.image[sl],
            foreground=self.foreground[sl],
            allowed=self.allowed[sl],
            occupied=self.occupied[sl],
            light=self.light,
            diameter=self.diameter,
            depth=self.depth[sl],
            fg_soft=self.fg_soft[sl],
            origin=(self.origin[0] + x0, self.origin[1] + y0),
            is_texture=self.is_texture,
            scale=self.scale,
            look=self.look,
        )


def foreground_depth(foreground: np.ndarray) -> np.ndarray:
    """Distance (px) from each pixel to the nearest non-product pixel; the frame counts as outside."""
    return ndi.distance_transform_edt(np.pad(foreground, 1))[1:-1, 1:-1].astype(np.float32)


def sample_centre(
    canvas: Canvas, radius: float, rng: np.random.Generator, gap: float | None = None
) -> tuple[float, float]:
    """Draw a defect centre (x, y) inside the allowed area.

    Preference order: allowed pixels at least `radius` deep inside the product and `radius + gap` away
    from earlier defects; then the deepest allowed pixels that are still free; then any free
    foreground pixel; then the deepest foreground pixel.

    Args:
        canvas: The drawing context.
        radius: Half the defect's extent in pixels.
        rng: Source of randomness.
        gap: Clearance from earlier defects; default a third of the radius plus 3 px.

    Returns:
        (x, y) in pixel coordinates, with sub-pixel jitter.
    """
    gap = radius / 3.0 + 3.0 if gap is None else gap
    if canvas.occupied.any():
        free = ndi.distance_transform_edt(~canvas.occupied) >= radius + gap
    else:
        free = np.ones(canvas.shape, bool)
    need = min(radius, 0.8 * float(canvas.depth.max()))
    tiers = [
        canvas.allowed & free & (canvas.depth >= need),
        canvas.allowed & free & (canvas.depth >= 0.5 * need),
        canvas.foreground & free & (canvas.depth >= need),
        canvas.allowed & free,
        canvas.foreground & free,
        canvas.foreground & (canvas.depth >= float(canvas.depth.max()) - 1.0),
    ]
    for cand in tiers:
        ys, xs = np.nonzero(cand)
        if ys.size:
            i = int(rng.integers(0, ys.size))
            return float(xs[i] + rng.uniform(-0.5, 0.5)), float(ys[i] + rng.uniform(-0.5, 0.5))
    h, w = canvas.shape
    return (w - 1) / 2.0, (h - 1) / 2.0


def light_vector(rng: np.random.Generator) -> tuple[float, float]:
    """A light direction from the upper left (the convention of most inspection set-ups), ±30°."""
    angle = np.deg2rad(225.0 + rng.uniform(-30.0, 30.0))
    return float(np.cos(angle)), float(np.sin(angle))

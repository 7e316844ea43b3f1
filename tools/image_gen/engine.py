"""The procedural defect engine: IG's embedded backend.

Why procedural: it runs on a CPU, offline, in milliseconds, is exactly reproducible from a seed, and
knows the true region of every defect it draws, which a diffusion inpainter does not. The engine reads
the instruction with the shared vocabulary, finds the product, picks a family renderer and composes
`spec.count` defects, each placed on the product in the requested position, away from the others, under
one light direction.

Every defect gets its own sampled appearance (`appearance.sample_look`: size, contrast, softness, outline,
interior) and is drawn camera-consistently (`camera`): on the input's low-pass layer, with the input's own
high-pass detail (noise, grain, block edges) added back everywhere afterwards, blurred to the input's
sharpness, and, for a JPEG input, with the touched blocks re-encoded at the input's quality.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tools.foreground import estimate_foreground, foreground_diameter
from tools.image_gen.appearance import finish_stamp, sample_look
from tools.image_gen.blending import Stamp, max_abs_diff
from tools.image_gen.blob import render_blob
from tools.image_gen.camera import (
    RENDER_SIGMA,
    JpegSettings,
    estimate_blur,
    estimate_noise,
    recompress_blocks,
    split_detail,
)
from tools.image_gen.deformation import render_deformation
from tools.image_gen.hole import render_hole
from tools.image_gen.line import render_line
from tools.image_gen.missing import render_missing
from tools.image_gen.placement import (
    Canvas,
    NotApplicable,
    foreground_depth,
    light_vector,
    region_area,
    region_mask,
    region_position,
)
from tools.image_gen.params import region_rule, type_params
from tools.image_gen.texture import render_texture
from tools.types import GenerationRequest, GenerationResult
from tools.vocabulary import DefectSpec, parse_instruction

logger = logging.getLogger(__name__)

Renderer = Callable[[Canvas, DefectSpec, np.random.Generator], Stamp]


#: One renderer per family. Every family is implemented; a renderer may still decline an image
#: (`NotApplicable`, e.g. "missing" on a texture), and then `FALLBACKS` names what is drawn instead.
RENDERERS: dict[str, Renderer] = {
    "line": render_line,
    "blob": render_blob,
    "hole": render_hole,
    "missing": render_missing,
    "deformation": render_deformation,
    "texture": render_texture,
}

#: Closest family and shape for each family, used when its renderer is missing or declines an image.
FALLBACKS: dict[str, tuple[str, str]] = {
    "missing": ("hole", "hole"),
    "deformation": ("line", "crack"),
    "texture": ("blob", "stain"),
    "line": ("line", "scratch"),
    "blob": ("blob", "stain"),
    "hole": ("hole", "hole"),
}

#: A pixel counts as changed when its (lightly smoothed) max-channel change reaches this many levels
#: (outside the defects the engine leaves every pixel as it was, so a faint defect's pixels still
#: count; MG's change mask uses the same level for such exact edits)...
VISIBLE_LEVEL = 1.5
#: ...and half the defect's typical change (75th percentile of its substantial changes where
#: alpha ≥ 0.5). This is the half-maximum convention: a defect's extent ends where its effect has
#: faded to half, as on a soft outline where the coverage crosses 0.5. MG's change mask uses the
#: same convention, so the two agree by design.
RELATIVE_LEVEL = 0.5
#: Coverage above which a pixel is part of the defect's support (context effects such as a scratch's
#: lip or a strand's shadow stay below it by design).
SUPPORT_ALPHA = 0.15
#: Percentile of the substantial changes taken as the defect's typical change (same as MG's default).
TYPICAL_PERCENTILE = 75.0


def defect_region(before: np.ndarray, after: np.ndarray, alpha: np.ndarray, sigma: float = 0.5) -> np.ndarray:
    """Pixels that belong to a defect and visibly changed: alpha ≥ 0.5 and a change of at least half
    the defect's typical change, with enclosed holes filled.

    Why the smoothing and the hole filling: grain and texture-preserving edits change neighbouring
    pixels by different amounts; a defect pixel that happens to change little is still part of it.

    Args:
        before: The window before the defect (float RGB).
        after: The window after it.
        alpha: The defect's relative strength over the window.
        sigma: Smoothing of the change map in pixels.

    Returns:
        Bool mask over the window.
    """
    # The defect's support is wherever it has some coverage; within it, the half-maximum of the change
    # decides (a thin soft line never reaches full coverage, so a coverage cut at 0.5 would thin it).
    core = alpha >= SUPPORT_ALPHA
    if not core.any():
        return core
    diff = ndi.gaussian_filter(max_abs_diff(after, before), sigma)
    inside = diff[core]
    # Typical change: 75th percentile of the substantial changes (at least half the near-maximum), so that a
    # faint part (a hole's lip next to its dark floor) does not lower the bar.
    strong = inside[inside >= 0.5 * np.percentile(inside, 95)]
    typical = float(np.percentile(strong, TYPICAL_PERCENTILE)) if strong.size else 0.0
    level = max(VISIBLE_LEVEL, RELATIVE_LEVEL * typical)
    visible = core & (diff >= level)
    # Bridge 1-px gaps (as MG's mask does) and fill enclosed holes.
    visible = (
        ndi.binary_closing(visible, ndi.generate_binary_structure(2, 1), border_value=0) & core | visible
    )
    return ndi.binary_fill_holes(visible)


def _plain(value: Any) -> Any:
    """`value` with numpy scalars turned into Python ones (the info goes into JSON and checkpoints)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class ProceduralEngine:
    """Draws defects described in the shared vocabulary onto normal images.

    Args:
        foreground_cache: How many foreground estimates to keep, keyed by image content; the agent
            calls IG several times on the same normal image.
    """

    def __init__(self, foreground_cache: int = 16) -> None:
        self._fg_cache: OrderedDict[tuple[str, bool], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._fg_cache_size = foreground_cache

    def foreground(self, image: np.ndarray, is_texture: bool) -> np.ndarray:
        """The product mask of `image`, cached by content."""
        return self._foreground(image, is_texture)[0]

    def _foreground(self, image: np.ndarray, is_texture: bool) -> tuple[np.ndarray, np.ndarray]:
        key = (hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest() + str(image.shape), is_texture)
        if key in self._fg_cache:
            self._fg_cache.move_to_end(key)
            return self._fg_cache[key]
        mask = estimate_foreground(image, is_texture)
        entry = (mask, foreground_depth(mask))
        self._fg_cache[key] = entry
        while len(self._fg_cache) > self._fg_cache_size:
            self._fg_cache.popitem(last=False)
        return entry

    def generate(
        self, image: np.ndarray, request: GenerationRequest, *, foreground: np.ndarray | None = None
    ) -> GenerationResult:
        """Draw the defect(s) the request's prompt describes.

        Args:
            image: uint8 RGB (H, W, 3), the normal image (not modified).
            request: Prompt (vocabulary instruction), category flags, default shape, region and seed.
            foreground: Optional bool mask (H, W) to draw on instead of the estimated product (tests and
                benchmarks use it to place defects deliberately off the object).

        Returns:
            `GenerationResult` with the edited uint8 image (through the request's JPEG quality when it
            has one), `region` (bool: pixels that belong to a
            defect and visibly changed), the parsed `spec`, and `info` with the sampled parameters
            (one entry per defect under "defects", plus "fallback" when another family stood in).
        """
        if (
            not isinstance(image, np.ndarray)
            or image.ndim != 3
            or image.shape[2] != 3
            or image.dtype != np.uint8
        ):
            raise ValueError(
                "ProceduralEngine.generate expects a uint8 RGB array (H, W, 3); "
                f"got {getattr(image, 'dtype', type(image))} {getattr(image, 'shape', None)}. "
                "Convert it at the edge."
            )
        spec = parse_instruction(request.prompt, default_shape=request.default_shape, region=request.region)
        rng = np.random.default_rng(request.seed)
        # Appearance draws come from their own stream, so a word changes its attribute and nothing else.
        look_rng = np.random.default_rng([request.seed if request.look_seed is None else request.look_seed, 0xD1CE])
        fg, depth = self._foreground(image, request.is_texture)
        diameter = foreground_diameter(fg)  # sizes stay relative to the product even when drawn elsewhere
        if foreground is not None:
            fg = np.asarray(foreground, bool)
            depth = foreground_depth(fg)
        params = type_params(request.category, request.anomaly_type)
        position = spec.position
        rule = region_rule(spec.region) if position in ("anywhere", "edge") else None
        if rule is not None:
            # The knowledge base's sub-region steers placement; "edge" narrows it to the outline band.
            allowed = region_area(fg, rule, rng, request.is_texture)
            if position == "edge" and rule != "edge":
                narrowed = allowed & region_mask(fg, "edge", rng)
                allowed = narrowed if narrowed.sum() >= 20 else allowed
        else:
            if position == "anywhere":
                position = region_position(spec.region) or "anywhere"
            allowed = region_mask(fg, position, rng)
        low, detail = split_detail(image)
        blur = estimate_blur(image)
        noise = estimate_noise(image)
        camera_sigma = float(np.sqrt(max(blur**2 - RENDER_SIGMA**2, 0.0)))
        canvas = Canvas(
            image=low.copy(),
            foreground=fg,
            allowed=allowed,
            occupied=np.zeros(fg.shape, bool),
            light=light_vector(rng),
            diameter=diameter,
            depth=depth,
            is_texture=request.is_texture,
            scale=params.extent,
        )
        info: dict[str, Any] = {
            "engine": "procedural",
            "shape": spec.shape,
            "family": spec.family,
            "seed": request.seed,
            "position": position,
            "region_rule": rule,
            "size": spec.size,
            "contrast": spec.contrast,
            "softness": spec.softness,
            "colour": spec.colour,
            "count": spec.count,
            "light_xy": [round(v, 3) for v in canvas.light],
            "foreground_fraction": round(float(fg.mean()), 4),
            "foreground_diameter_px": round(canvas.diameter, 1),
            "camera_noise_sigma": round(noise, 2),
            "camera_blur_px": round(blur, 2),
            "jpeg_quality": request.jpeg_quality,
            "defects": [],
        }
        draw_spec, renderer, fallback = self._renderer_for(spec)
        if fallback:
            info["fallback"] = fallback
        region = np.zeros(fg.shape, bool)
        drawn: list[tuple[tuple[slice, slice], np.ndarray, dict[str, Any]]] = []
        for _ in range(spec.count):
            look = sample_look(draw_spec, look_rng, is_texture=request.is_texture, strength=params.strength)
            canvas.look = look
            stamp, draw_spec, renderer = self._draw(canvas, draw_spec, renderer, rng, info)
            x0, y0, x1, y1 = stamp.box
            win = (slice(y0, y1), slice(x0, x1))
            before = canvas.image[win]
            extent = canvas.extent(draw_spec.size, look_rng)
            out, alpha, finished = finish_stamp(
                before,
                stamp.image,
                stamp.alpha,
                look,
                family=draw_spec.family,
                extent=extent,
                camera_sigma=camera_sigma,
                surface=before + detail[win],
                thickness=3.0 * stamp.info["width_px"] if draw_spec.family == "line" and "width_px" in stamp.info else None,
                rng=look_rng,
            )
            stamp.alpha = alpha
            stamp.info["box"] = list(stamp.box)
            stamp.info["look"] = look.as_info() | finished
            info["defects"].append(stamp.info)
            drawn.append((win, alpha, stamp.info))
            canvas.occupied[win] |= stamp.alpha >= 0.05
            canvas.image[win] = out
            if draw_spec.family in ("deformation", "texture", "missing"):
                # Pixels that moved or were replaced keep the input's noise but not its fine structure
                # (an outline's edge left behind would show as a coloured fringe): there the detail is
                # clipped to the noise's amplitude.
                cap = max(4.5 * noise, 2.0)
                w = np.clip(alpha, 0, 1)[..., None]
                detail[win] = detail[win] * (1 - w) + np.clip(detail[win], -cap, cap) * w
        # The input's own detail (noise, grain, block edges) goes back everywhere, the defects included.
        edited = np.clip(np.round(canvas.image + detail), 0, 255).astype(np.uint8)
        # Each defect's region is cut from the delivered pixels (before any JPEG pass, whose block noise
        # is no part of the defect), so that it is exactly what a difference of the two images shows.
        for win, alpha, stamp_info in drawn:
            mine = defect_region(image[win].astype(np.float32), edited[win].astype(np.float32), alpha)
            region[win] |= mine
            stamp_info["area_px"] = int(mine.sum())
        if request.jpeg_quality is not None:
            settings = JpegSettings(request.jpeg_quality, request.jpeg_subsampling)
            edited = recompress_blocks(edited, (edited != image).any(axis=-1), settings)
        info["area_fraction"] = round(float(region.mean()), 5)
        info["region_in_foreground"] = round(float((region & fg).sum() / max(region.sum(), 1)), 4)
        if not region.any():
            logger.warning(
                "the %s came out invisible (seed %d); the region is empty", spec.shape, request.seed
            )
        return GenerationResult(image=edited, region=region, spec=spec, info=_plain(info))

    @staticmethod
    def _draw(
        canvas: Canvas, spec: DefectSpec, renderer: Renderer, rng: np.random.Generator, info: dict[str, Any]
    ) -> tuple[Stamp, DefectSpec, Renderer]:
        """Run the renderer, or its family's fallback when it declines the image (noted in `info`)."""
        try:
            return renderer(canvas, spec, rng), spec, renderer
        except NotApplicable as exc:
            fam, shape = FALLBACKS[spec.family]
            logger.info("%s cannot draw here (%s); falling back to %s", spec.shape, exc, shape)
            info["fallback"] = f"{spec.family}->{fam}:{shape} ({exc})"
            spec = spec.model_copy(update={"family": fam, "shape": shape})
            renderer = RENDERERS[fam]
            return renderer(canvas, spec, rng), spec, renderer

    @staticmethod
    def _renderer_for(spec: DefectSpec) -> tuple[DefectSpec, Renderer, str | None]:
        """The renderer for the spec's family, or the closest implemented one with a note why."""
        if spec.family in RENDERERS:
            return spec, RENDERERS[spec.family], None
        fam, shape = FALLBACKS[spec.family]
        note = f"{spec.family}->{fam}:{shape} (family not implemented)"
        logger.info("no renderer for family %s; drawing a %s instead", spec.family, shape)
        return spec.model_copy(update={"family": fam, "shape": shape}), RENDERERS[fam], note

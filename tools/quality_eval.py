"""QE, the embedded backend: a metric judge that scores an edit from image statistics and CNN features.

Why metrics and not a model: offline on a CPU there is no VLM to ask, but the ways an edit fails are
measurable. The judge finds what changed (the same change mask MG uses) and then asks:

* location (0–5): is the change on the object, of a plausible size for the instruction's size word and
  large enough for the image to resolve (`MIN_PIXELS`), in the part of the object its position word names,
  and one defect rather than changes scattered over the image?
* quality (0–5): does it stand out from the surface's own texture (pixel contrast against the local
  texture, and the distance in ImageNet CNN features, `tools.features`, integrated over the defect's area
  as a matched filter would: a faint change shows over many pixels, not on a speck), without garish colour or
  clipping, without a hard pasted seam, keeping the surface texture under it, and with nothing changed
  outside it? And is it free of the cues a detector would learn instead of the defect: sensor noise,
  blur or JPEG blocking inside that differ from around it, a flat inside, seam energy piled on its
  outline?

Every failed check lowers one score by a graded penalty and names a fix in the shared vocabulary
(`contrast=high`, `size=small`, `softness=soft`, `position=center`, `interior=textured`,
`noise=match`...), so the policy's next instruction moves the result in the right direction. All
measurements are returned in `Evaluation.details`.

The thresholds were set on the calibration seeds of `evals/bench_qe.py` and are reported there on
held-out seeds and images.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from skimage import color

from tools.image_gen.camera import estimate_noise, highpass_ratio, residual_ratio, ring
from tools.image_gen.appearance import SIZE_RANGE
from tools.foreground import estimate_foreground, foreground_diameter
from tools.mask_gen import change_mask
from tools.types import Evaluation, EvaluationRequest
from tools.vocabulary import COLOURS, CONTRASTS, INTERIORS, SIZES, DefectSpec, Fix, find_shape, format_fixes, parse_instruction, step

logger = logging.getLogger(__name__)

#: Families whose edges should fade (stains, transplanted texture, warps); lines, holes and broken
#: parts have crisp edges by nature.
_SOFT_FAMILIES = {"blob", "texture", "deformation"}
#: Shapes of a soft family that are cut out as a block (a shifted or mirrored piece): crisp like a line.
_CRISP_SHAPES = {"misplaced", "flip", "contamination"}
#: Families whose inside keeps the surface texture (changed in tone, not replaced).
_TEXTURE_KEEPING = {"blob", "line", "hole", "deformation"}

#: Largest plausible area of one defect relative to the object, per size word (textures: the frame); never
#: below a filled disc at the engine's largest extent for the word (extent² of the object's area), so QE does
#: not call "too large" what IG was asked to draw.
_MAX_AREA = {word: max(area, SIZE_RANGE[word][1] ** 2)
             for word, area in {"tiny": 0.012, "small": 0.025, "medium": 0.05, "large": 0.09}.items()}
#: Largest plausible extent (longest side of its box) relative to the object's equivalent diameter.
_MAX_EXTENT = {"tiny": 0.25, "small": 0.35, "medium": 0.45, "large": 0.6}
#: Smallest area that reads as a defect at inspection scale, relative to the object.
MIN_AREA = 0.0004
#: Smallest area in pixels that the image resolves as a defect (about a 5-pixel disc): fewer pixels are
#: a speck no inspector could label, and a mask on them teaches a detector to fire on normal texture.
MIN_PIXELS = 24
#: Visibility (change over the surface's own spread) at which a defect starts to show, and is plain.
VISIBLE = (0.45, 0.95)
#: The area (pixels, an 8x8 patch) at which visibility is read as measured; larger defects integrate it.
REF_PIXELS = 64
#: Noise ratio (inside over ring, relative to the normal image's) that passes: outside it a detector sees
#: a denoised, blurred or foreign-noise patch.
NOISE_BAND = (0.7, 1.45)
#: The same for 8x8 JPEG blockiness on JPEG inputs.
BLOCK_BAND = (0.7, 1.5)
#: Interior texture (relative to the ring's, normal-relative) below which the inside reads as a flat fill
#: (fully flat at the first value, fine from the second).
FLAT_INTERIOR = (0.45, 0.7)
#: Seam energy (outline over the bands beside it) from which a soft defect's edge reads as pasted.
SEAM_ENERGY = (6.0, 20.0)


@dataclass
class _Finding:
    """One failed check: which score it lowers, by how much, what to say, what to change."""

    score: str  # "location" | "quality"
    penalty: float
    message: str
    fixes: list[Fix] = field(default_factory=list)


def _luma(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 at or below `lo`, 1 at or above `hi`, linear between."""
    return float(np.clip((x - lo) / max(hi - lo, 1e-9), 0.0, 1.0))


def _centroid_matches(mask: np.ndarray, foreground: np.ndarray, position: str) -> bool:
    """Whether the defect's centroid lies in the part of the object's box the position word names."""
    if position in ("anywhere", "edge"):
        return True
    ys, xs = np.nonzero(foreground)
    if ys.size == 0:
        return True
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cy, cx = ndi.center_of_mass(mask)
    fy, fx = (cy - y0) / max(1, y1 - y0), (cx - x0) / max(1, x1 - x0)
    checks = {
        "top": fy < 0.55,
        "bottom": fy > 0.45,
        "left": fx < 0.55,
        "right": fx > 0.45,
        "center": abs(fy - 0.5) < 0.3 and abs(fx - 0.5) < 0.3,
    }
    return all(checks[part] for part in position.split("-") if part in checks)


def _catalog_defaults(request: EvaluationRequest) -> tuple[str, str | None, str | None]:
    """(default shape, sub-region, family) of the request's type from the knowledge base, if known."""
    try:
        from tools.knowledge.catalog import load_catalog

        entry = load_catalog().entry(request.category, request.anomaly_type)
        return entry.shape, entry.region, entry.family
    except (ValueError, KeyError, OSError):
        return find_shape(request.anomaly_type) or "stain", None, None


class MetricJudge:
    """Scores location and quality 0–5 each; passes when both reach their thresholds.

    Args:
        pass_location: Smallest location score that passes.
        pass_quality: Smallest quality score that passes.
        use_features: Compare CNN features too (EfficientNet-Lite0); without them the judge runs on
            pixel statistics alone, a little less discriminative.
        cache_size: Normal images whose foreground and features are kept (the agent judges several edits
            of the same normal image).
    """

    def __init__(self, pass_location: float = 3.0, pass_quality: float = 3.0, *, use_features: bool = True,
                 cache_size: int = 8) -> None:
        self.pass_location = pass_location
        self.pass_quality = pass_quality
        self.use_features = use_features
        self._cache: OrderedDict[tuple[str, bool], dict] = OrderedDict()
        self._cache_size = cache_size

    # ------------------------------------------------------------------------------------------ API

    def evaluate(self, normal: np.ndarray, edited: np.ndarray, request: EvaluationRequest) -> Evaluation:
        """Judge `edited` against `normal`.

        Args:
            normal: The image before the edit, uint8 RGB.
            edited: The image after the edit, same shape.
            request: Category, defect type, the instruction used, whether the category is a texture.

        Returns:
            The evaluation with scores, a review naming concrete fixes, and the raw measurements.
        """
        if normal.shape != edited.shape:
            raise ValueError(f"images differ in shape: {normal.shape} vs {edited.shape}; resize the edit to the normal image")
        shape, region, family = _catalog_defaults(request)
        spec = parse_instruction(request.prompt or request.anomaly_type.replace("_", " "), default_shape=shape, region=region)
        if family and not request.prompt:
            spec = spec.model_copy(update={"family": family})
        details = self.measure(normal, edited, spec, request.is_texture)
        findings = self._findings(details, spec)
        location = max(0.0, 5.0 - sum(f.penalty for f in findings if f.score == "location"))
        quality = max(0.0, 5.0 - sum(f.penalty for f in findings if f.score == "quality"))
        if details.get("changed_fraction", 0.0) == 0.0:
            location = quality = 0.0
        passed = location >= self.pass_location and quality >= self.pass_quality
        fixes = _merge_fixes([fix for f in sorted(findings, key=lambda f: -f.penalty) for fix in f.fixes])
        messages = [f.message for f in sorted(findings, key=lambda f: -f.penalty) if f.penalty >= 0.25]
        if not messages:
            review = "Good: visible, on the object, a plausible size, blends with the surface."
        else:
            review = " ".join(messages) + (f" {format_fixes(fixes)}" if fixes else "")
        return Evaluation(
            location=round(location, 2),
            quality=round(quality, 2),
            passed=passed,
            review=review,
            fixes=fixes,
            details={k: round(float(v), 4) for k, v in details.items()},
        )

    # --------------------------------------------------------------------------------- measurement

    def _normal_facts(self, normal: np.ndarray, is_texture: bool) -> dict:
        """Foreground, Lab and texture statistics of the normal image, cached by content."""
        key = (hashlib.blake2b(normal.tobytes(), digest_size=16).hexdigest() + str(normal.shape), is_texture)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        fg = estimate_foreground(normal, is_texture)
        lab = color.rgb2lab(normal).astype(np.float32)
        chroma = np.hypot(lab[..., 1], lab[..., 2])
        luma = _luma(normal)
        facts = {
            "fg": fg,
            "fg_near": ndi.binary_dilation(fg, iterations=2),
            "depth": ndi.distance_transform_edt(np.pad(fg, 1))[1:-1, 1:-1],
            "diameter": foreground_diameter(fg),
            "chroma_ref": float(np.percentile(chroma[fg], 99)) if fg.any() else 0.0,
            "clipped": float(((normal[fg] <= 2) | (normal[fg] >= 253)).any(axis=1).mean()) if fg.any() else 0.0,
            "luma": luma,
            "lab": lab,
            "highpass": luma - ndi.gaussian_filter(luma, 1.5),
            "noise": estimate_noise(normal),
            "blocky": _blocky(luma),
            "features": {},
        }
        self._cache[key] = facts
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return facts

    def measure(self, normal: np.ndarray, edited: np.ndarray, spec: DefectSpec, is_texture: bool) -> dict[str, float]:
        """Every measurement the verdict rests on (see the module docstring)."""
        facts = self._normal_facts(normal, is_texture)
        fg, h, w = facts["fg"], normal.shape[0], normal.shape[1]
        diff = np.abs(edited.astype(np.float32) - normal.astype(np.float32)).max(axis=2)
        mask = change_mask(normal, edited).mask
        d: dict[str, float] = {"changed_fraction": float(mask.mean())}
        # Outside: everything farther than a few pixels from the change (or everything, when nothing
        # stands out: a global shift lifts MG's noise floor and hides itself).
        reach = max(4, int(round(0.02 * min(h, w))))
        far = ~ndi.binary_dilation(mask, iterations=reach) if mask.any() else np.ones_like(mask)
        d["outside_level"] = float(diff[far].mean()) if far.any() else 0.0
        d["outside_fraction"] = float((diff[far] > 6).mean()) if far.any() else 0.0
        if not mask.any():
            d["strength"] = float(np.percentile(diff, 99))
            return d
        # The defect itself: the largest `count` components and what lies close to them; the rest is
        # scattered change.
        # Group the changed pixels that lie close together (a warped or mirrored patch changes in
        # fragments), keep the largest `count` groups as the defect, and call the rest stray.
        gap = max(reach, int(round(0.06 * facts["diameter"])))
        _, n = ndi.label(mask, structure=np.ones((3, 3)))
        groups, n_groups = ndi.label(ndi.binary_dilation(mask, iterations=gap), structure=np.ones((3, 3)))
        sizes = ndi.sum(mask, groups, index=np.arange(1, n_groups + 1))
        keep = np.argsort(sizes)[::-1][: max(1, spec.count)] + 1
        near_main = np.isin(groups, keep)
        stray = mask & ~near_main
        d["components"] = float(n)
        d["stray_fraction"] = float(stray.sum() / mask.sum())
        defect = mask & near_main
        area = float(defect.sum())
        fg_area = float(max(fg.sum(), 1))
        ys, xs = np.nonzero(defect)
        d["area_vs_object"] = area / fg_area
        d["area_px"] = area
        d["extent_vs_object"] = float(max(np.ptp(ys), np.ptp(xs)) + 1) / facts["diameter"]
        d["on_object"] = float((defect & facts["fg_near"]).sum() / area)
        d["edge_distance"] = float(np.median(facts["depth"][defect]) / facts["diameter"])
        d["position_ok"] = float(_centroid_matches(defect, fg, spec.position))
        # Visibility: the change against the surface's own spread around it, apart for lightness and for
        # hue (a dye shows on a busy texture whose lightness pattern would hide a darkening).
        ring = ndi.binary_dilation(defect, iterations=6) & ~ndi.binary_dilation(defect, iterations=2) & fg
        if ring.sum() <= 8:
            ring = fg
        luma = facts["luma"]
        lab_n = facts["lab"]
        surface_l = float(np.std(lab_n[..., 0][ring]))
        surface_c = float(np.sqrt(np.var(lab_n[..., 1][ring]) + np.var(lab_n[..., 2][ring])))
        strength = float(np.percentile(diff[defect], 75))
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        lab_e = color.rgb2lab(edited[y0:y1, x0:x1]).astype(np.float32)
        sub = defect[y0:y1, x0:x1]
        dlab = (lab_e - lab_n[y0:y1, x0:x1])[sub]
        d_l = float(np.percentile(np.abs(dlab[:, 0]), 75))
        d_c = float(np.percentile(np.hypot(dlab[:, 1], dlab[:, 2]), 75))
        d.update(strength=strength, surface_std=surface_l, surface_chroma_std=surface_c,
                 visibility_l=d_l / (surface_l + 2.0), visibility_c=d_c / (surface_c + 8.0))
        d["visibility"] = max(d["visibility_l"], d["visibility_c"])
        chroma_e = np.hypot(lab_e[..., 1], lab_e[..., 2])[sub]
        d["chroma"] = float(np.percentile(chroma_e, 90))
        d["chroma_excess"] = d["chroma"] - max(facts["chroma_ref"], _named_chroma(spec.colour), 30.0)
        chroma_n = np.hypot(facts["lab"][y0:y1, x0:x1, 1], facts["lab"][y0:y1, x0:x1, 2])[sub]
        d["chroma_gain"] = float(np.percentile(chroma_e - chroma_n, 90))
        lit = (facts["luma"][defect] >= 40)[:, None]
        clipped_e = ((edited[defect] <= 2) & lit) | (edited[defect] >= 253)
        clipped_n = (normal[defect] <= 2) | (normal[defect] >= 253)
        d["clipped"] = float((clipped_e & ~clipped_n).any(axis=1).mean())
        # A product with clipped highlights of its own may show them moved or widened by a defect.
        d["clipped_normal"] = facts["clipped"]
        # Seam: the change's profile across the outline. A faded edge changes half as much one pixel
        # inside as deep inside, and something just outside; a pasted edge jumps from nothing to all.
        inner = ndi.distance_transform_edt(defect)
        outer = ndi.distance_transform_edt(~defect)
        d["width"] = 2.0 * float(inner.max())
        top = float(np.percentile(diff[defect], 90)) + 1e-3
        d_in = float(np.median(diff[(inner > 0) & (inner <= 1.5)]))
        d_out = float(np.median(diff[(outer > 0) & (outer <= 1.5)]))
        d["hardness"] = (d_in - d_out) / top
        interior = inner >= 2
        if interior.sum() >= 12:
            # Texture kept: local contrast inside, relative to the normal's, per unit of brightness change.
            hp_e = _luma(edited) - ndi.gaussian_filter(_luma(edited), 1.5)
            hp_n = facts["highpass"]
            sn = float(np.std(hp_n[interior]))
            d["texture_normal"] = sn
            if sn > 1.5:
                brightness = (float(luma[interior].mean()) + 5.0) / (float(_luma(edited)[interior].mean()) + 5.0)
                d["texture_kept"] = float(np.std(hp_e[interior])) / sn * brightness
                a, b = hp_n[interior], hp_e[interior]
                d["texture_corr"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
        d.update(_camera_measures(facts, normal, edited, defect))
        if self.use_features:
            d.update(self._feature_measures(normal, edited, defect, facts))
        return d

    def _feature_measures(self, normal: np.ndarray, edited: np.ndarray, defect: np.ndarray, facts: dict) -> dict[str, float]:
        """CNN-feature distances: on the defect (a crop around it) and away from it (the whole image)."""
        try:
            from tools.features import feature_distance, feature_maps
        except ImportError:  # pragma: no cover
            return {}
        from PIL import Image

        h, w = defect.shape
        side = 128
        ys, xs = np.nonzero(defect)
        cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
        half = int(min(max(max(np.ptp(ys), np.ptp(xs)) * 0.9 + 8, 24), min(h, w) / 2))
        y0, x0 = int(np.clip(cy - half, 0, h - 2 * half)), int(np.clip(cx - half, 0, w - 2 * half))
        box = (slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))

        def resized(img: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BILINEAR))

        try:
            if "full" not in facts["features"]:
                facts["features"]["full"] = feature_maps([resized(normal)])[0]
            fn_full = facts["features"]["full"]
            fn_crop, fe_crop, fe_full = feature_maps([resized(normal[box]), resized(edited[box]), resized(edited)])
        except Exception as exc:  # noqa: BLE001 - a missing package must not kill the judge
            logger.warning("CNN features unavailable, judging on pixels alone: %s", exc)
            self.use_features = False
            return {}
        out: dict[str, float] = {}
        crop_mask = np.asarray(Image.fromarray(defect[box].astype(np.uint8) * 255).resize((side, side))) > 127
        for level, dist in enumerate(feature_distance(fn_crop, fe_crop)):
            cells = _cells(crop_mask, dist.shape)
            out[f"feat_defect_{level}"] = float(dist[cells].max()) if cells.any() else float(dist.max())
        full_mask = np.asarray(Image.fromarray(ndi.binary_dilation(defect, iterations=4).astype(np.uint8) * 255)
                               .resize((side, side))) > 0
        for level, dist in enumerate(feature_distance(fn_full, fe_full)):
            cells = _cells(full_mask, dist.shape, dilate=1)
            far = ~cells
            out[f"feat_outside_{level}"] = float(dist[far].mean()) if far.any() else 0.0
        return out

    # ---------------------------------------------------------------------------------- the verdict

    def _findings(self, d: dict[str, float], spec: DefectSpec) -> list[_Finding]:
        findings: list[_Finding] = []
        if d["changed_fraction"] == 0.0:
            fixes = [Fix(attribute="contrast", value="high"), Fix(attribute="size", value=step(SIZES, spec.size, 1))]
            return [_Finding("quality", 5.0, "No visible defect: nothing in the edit stands out from the normal image.", fixes)]
        findings += self._location_findings(d, spec)
        findings += self._quality_findings(d, spec)
        return findings

    @staticmethod
    def _location_findings(d: dict[str, float], spec: DefectSpec) -> list[_Finding]:
        out: list[_Finding] = []
        off = 1.0 - d["on_object"]
        if off > 0.03:
            target = "center" if spec.position in ("anywhere", "edge") else spec.position
            out.append(_Finding("location", 5.0 * _ramp(off, 0.02, 0.15) + 0.5,
                                f"{100 * off:.0f}% of the defect lies off the object.",
                                [Fix(attribute="position", value=target)]))
        size = spec.size if spec.size in _MAX_AREA else "medium"
        over = max(d["area_vs_object"] / _MAX_AREA[size], d["extent_vs_object"] / _MAX_EXTENT[size])
        if over > 1.0:
            steps = -2 if over > 2.5 else -1
            out.append(_Finding("location", 4.0 * _ramp(over, 1.0, 2.0) + 0.5,
                                f"Too large: the defect covers {100 * d['area_vs_object']:.0f}% of the object.",
                                [Fix(attribute="size", value=step(SIZES, size, steps))]))
        elif d.get("area_px", MIN_PIXELS) < MIN_PIXELS:
            out.append(_Finding("location", 2.5, f"Too small for this resolution: the defect covers {d['area_px']:.0f} pixels.",
                                [Fix(attribute="size", value=step(SIZES, spec.size, _size_steps(d["area_px"])))]))
        elif d["area_vs_object"] < MIN_AREA:
            out.append(_Finding("location", 1.5, "Too small to see at inspection scale.",
                                [Fix(attribute="size", value=step(SIZES, spec.size, 1))]))
        if d["stray_fraction"] > 0.05:
            out.append(_Finding("location", 4.0 * _ramp(d["stray_fraction"], 0.05, 0.4) + 0.5,
                                "Changes are scattered over the image instead of one defect."))
        if not d.get("position_ok", 1.0):
            out.append(_Finding("location", 0.75, f"Not in the {spec.position} as instructed.",
                                [Fix(attribute="position", value=spec.position)]))
        return out

    @staticmethod
    def _quality_findings(d: dict[str, float], spec: DefectSpec) -> list[_Finding]:
        out: list[_Finding] = []
        # Visible: pixel contrast against the texture, or a clear change in CNN features.
        feat = d.get("feat_defect_1")
        vis = d["visibility"]
        # Pixel contrast against the surface leads; the CNN's view adds texture masking (CNN features are
        # unit-normalised, so blind to a pure hue change: they only support, never veto).
        combined = vis if feat is None else 0.65 * vis + 0.35 * min(feat, vis + 0.5)
        # Integrated over the defect, as a matched filter sees it: a faint change over many pixels shows,
        # the same change on a speck does not.
        combined *= float(np.clip(np.sqrt(d.get("area_px", REF_PIXELS) / REF_PIXELS), 0.5, 4.0))
        seen = _ramp(combined, *VISIBLE)
        if seen < 1.0:
            fixes = [Fix(attribute="contrast", value=step(CONTRASTS, spec.contrast, 1))]
            if spec.contrast == "high" or d["area_vs_object"] < 4 * MIN_AREA:
                fixes.append(Fix(attribute="size", value=step(SIZES, spec.size, 1)))
            out.append(_Finding("quality", 4.5 * (1.0 - seen), "Too faint: the defect barely stands out from the surface.", fixes))
        # Garish: colours far beyond the product's own, clipped pixels, a change beyond the image's range.
        # (Moving a piece of the product may move its own clipped highlights: no clipping check there.)
        clip = _ramp(d["clipped"], 0.05, 0.25) if spec.shape not in _CRISP_SHAPES - {"contamination"} else 0.0
        colour = min(_ramp(d["chroma_excess"], 5.0, 25.0), _ramp(d.get("chroma_gain", 99.0), 10.0, 25.0))
        garish = max(colour, clip)
        if garish > 0:
            fixes = [Fix(attribute="contrast", value="low" if garish > 0.5 else step(CONTRASTS, spec.contrast, -1))]
            out.append(_Finding("quality", 3.5 * garish + 0.5, "Garish: the colour or strength is beyond any real defect.", fixes))
        # Seam: a hard outline where the change should fade, or a patch that replaced the texture.
        hard = d.get("hardness")
        if hard is not None:
            soft = spec.family in _SOFT_FAMILIES and spec.shape not in _CRISP_SHAPES
            seam = _ramp(hard, 0.55, 0.8) if soft else _ramp(hard, 0.8, 0.92)
            if soft:
                seam = max(seam, _ramp(d.get("seam_energy", 0.0), SEAM_ENERGY[0], SEAM_ENERGY[1]))
            if seam > 0:
                out.append(_Finding("quality", 3.0 * seam + 0.5, "A hard pasted seam outlines the defect.",
                                    [Fix(attribute="softness", value="soft")]))
        kept = d.get("texture_kept")
        flat = 0.0
        if (kept is not None and spec.family in _TEXTURE_KEEPING and spec.shape not in _CRISP_SHAPES | {"glue"}
                and d.get("texture_normal", 0) > 3.0):
            flat = 1.0 - _ramp(kept, 0.2, 0.45)
        if d.get("interior_texture") is not None and spec.family != "line":
            flat = max(flat, 1.0 - _ramp(d["interior_texture"], FLAT_INTERIOR[0], FLAT_INTERIOR[1]))
        if flat > 0:
            out.append(_Finding("quality", 3.0 * flat + 0.5, "Flat patch: the surface texture is lost inside the defect.",
                                [Fix(attribute="interior", value="textured")]))
        out += _camera_findings(d, spec)
        # Outside: pixels or features changed away from the defect.
        outside = max(_ramp(d["outside_level"], 1.0, 3.0), _ramp(d["outside_fraction"], 0.01, 0.05),
                      _ramp(d.get("feat_outside_0", 0.0), 0.01, 0.04))
        if outside > 0:
            out.append(_Finding("quality", 4.0 * outside + 0.5,
                                "Pixels outside the defect changed; the rest of the image must stay as it was."))
        return out


def _size_steps(area_px: float) -> int:
    """Size words to go up for a defect of `area_px` pixels to reach `MIN_PIXELS`.

    Why more than one for a speck: near the bottom of its range a word's extent is held at the engine's
    smallest defect, so the next word may draw the same few pixels; a speck far under the floor is
    sent up two or three words, and the loop's budget is not spent one word at a time.
    """
    return 1 + int(area_px < MIN_PIXELS / 2) + int(area_px < MIN_PIXELS / 6)


def _camera_findings(d: dict[str, float], spec: DefectSpec) -> list[_Finding]:
    """Noise, blur and compression that differ inside the defect from around it: a cue only synthetic
    defects carry (a detector learns it instead of the defect). A noisier inside may also be an interior
    texture finer than the surface's: the fix then asks for a calmer interior as well."""
    out: list[_Finding] = []
    noise = d.get("noise_mismatch")
    if noise is not None:
        off = max(_ramp(NOISE_BAND[0] / max(noise, 1e-3), 1.0, 1.6), _ramp(noise / NOISE_BAND[1], 1.0, 1.6))
        if off > 0:
            how = "cleaner or blurrier" if noise < 1 else "noisier"
            fixes = [Fix(attribute="noise", value="match")]
            if noise > 1:
                fixes.append(Fix(attribute="interior", value=step(INTERIORS, spec.interior or "textured", -1)))
            out.append(_Finding("quality", 3.0 * off + 0.5,
                                f"Camera mismatch: the defect is {how} than its surroundings (noise ratio {noise:.2f}).",
                                fixes))
    blocks = d.get("blockiness_mismatch")
    if blocks is not None:
        off = max(_ramp(BLOCK_BAND[0] / max(blocks, 1e-3), 1.0, 1.5), _ramp(blocks / BLOCK_BAND[1], 1.0, 1.5))
        if off > 0:
            out.append(_Finding("quality", 3.0 * off + 0.5,
                                f"Compression mismatch: the defect's JPEG blocking differs from the image's (ratio {blocks:.2f}).",
                                [Fix(attribute="noise", value="match")]))
    return out


def _camera_measures(facts: dict, normal: np.ndarray, edited: np.ndarray, defect: np.ndarray) -> dict[str, float]:
    """What a detector would key on besides the defect itself.

    Each mismatch is a ratio inside the defect over a ring just outside it in the edit, divided by the
    same ratio in the normal image (so a defect that happens to sit on a smoother or busier spot is not
    blamed): sensor noise (the finest residual), texture (a band-pass residual), and on JPEG-like inputs
    8x8 blockiness; plus the seam energy of the change at the outline. 1.0 is a perfect match.
    """
    out: dict[str, float] = {"seam_energy": _seam_energy(_luma(edited) - facts["luma"], defect)}
    interior = ndi.binary_erosion(defect, iterations=1)
    band = ring(interior) & facts["fg_near"]
    if interior.sum() < 20 or band.sum() < 20:
        return out
    out["noise_normal"] = facts["noise"]
    if facts["noise"] >= 0.8:
        noise_e, noise_n = residual_ratio(edited, interior), residual_ratio(normal, interior)
        if noise_e is not None and noise_n is not None:
            out["noise_mismatch"] = noise_e / max(noise_n, 1e-3)
    texture_e, texture_n = highpass_ratio(edited, interior, 1.5), highpass_ratio(normal, interior, 1.5)
    if texture_e is not None and texture_n is not None and _robust_std(facts["highpass"][band]) >= 2.0:
        out["interior_texture"] = texture_e / max(texture_n, 1e-3)
    out["blocky_normal"] = facts["blocky"]
    if facts["blocky"] >= JPEG_BLOCKY:
        zone = ndi.binary_dilation(interior, iterations=1)
        luma_e = _luma(edited)
        ratio_e = _blocky(luma_e, zone) / _blocky(luma_e, band)
        ratio_n = _blocky(facts["luma"], zone) / _blocky(facts["luma"], band)
        out["blockiness_mismatch"] = ratio_e / max(ratio_n, 1e-3)
    return out


#: Global 8x8 blocking of a normal image from which it counts as a JPEG (PNG samples measure <= 1.15,
#: JPEGs of quality 60-90 >= 1.22).
JPEG_BLOCKY = 1.2


def _robust_std(values: np.ndarray) -> float:
    """Std from the median absolute value of a zero-mean residual (edges and texture spikes barely move it)."""
    return float(1.4826 * np.median(np.abs(values))) if values.size else 0.0


def _blocky(luma: np.ndarray, where: np.ndarray | None = None) -> float:
    """8x8 JPEG blocking: the mean second difference of luma centred on the pixels either side of a block
    border over that elsewhere (1.0: no blocking; second differences ignore smooth shading). With `where`,
    only differences whose three pixels lie in it count."""
    d2x = np.abs(luma[:, :-2] - 2 * luma[:, 1:-1] + luma[:, 2:])
    d2y = np.abs(luma[:-2] - 2 * luma[1:-1] + luma[2:])
    at_x = np.broadcast_to(np.isin(np.arange(1, luma.shape[1] - 1) % 8, (0, 7))[None, :], d2x.shape)
    at_y = np.broadcast_to(np.isin(np.arange(1, luma.shape[0] - 1) % 8, (0, 7))[:, None], d2y.shape)
    ok_x = np.ones(d2x.shape, bool) if where is None else where[:, :-2] & where[:, 1:-1] & where[:, 2:]
    ok_y = np.ones(d2y.shape, bool) if where is None else where[:-2] & where[1:-1] & where[2:]
    on = np.concatenate([d2x[ok_x & at_x], d2y[ok_y & at_y]])
    off = np.concatenate([d2x[ok_x & ~at_x], d2y[ok_y & ~at_y]])
    if on.size < 16 or off.size < 16:
        return 1.0
    return float((on.mean() + 0.1) / (off.mean() + 0.1))


def _seam_energy(change: np.ndarray, region: np.ndarray) -> float:
    """Gradient energy of the change on the region's outline over that just inside or just outside it.

    A change that fades over a few pixels, or varies inside (texture), spreads its gradient over all
    three bands (ratio near 1-3); a pasted patch puts all of it on the outline (ratio >> 3). 0.0 when
    the region has no interior band to compare with.
    """
    gy, gx = np.gradient(change)
    energy = gx * gx + gy * gy
    inside = ndi.distance_transform_edt(region)
    outside = ndi.distance_transform_edt(~region)
    outline = ((inside > 0) & (inside <= 1.5)) | ((outside > 0) & (outside <= 1.5))
    near_in = (inside > 1.5) & (inside <= 4.5)
    near_out = (outside > 1.5) & (outside <= 4.5)
    if near_in.sum() < 8 or not outline.any():
        return 0.0
    # Each band's typical energy (75th percentile: a few texture spikes do not make a seam).
    e_near = max(float(np.percentile(energy[near_in], 75)), float(np.percentile(energy[near_out], 75)))
    return (float(np.percentile(energy[outline], 75)) + 1.0) / (e_near + 1.0)


def _named_chroma(colour: str) -> float:
    """Lab chroma of a named colour of the vocabulary (0 for relative words such as "dark")."""
    rgb = COLOURS.get(colour)
    if rgb is None:
        return 0.0
    lab = color.rgb2lab(np.asarray(rgb, np.uint8).reshape(1, 1, 3))[0, 0]
    return float(np.hypot(lab[1], lab[2]))


def _cells(mask: np.ndarray, shape: tuple[int, int], dilate: int = 0) -> np.ndarray:
    """Which cells of a feature grid `shape` a pixel mask touches."""
    gh, gw = shape
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cells = np.zeros(shape, bool)
    cells[np.minimum(ys * gh // h, gh - 1), np.minimum(xs * gw // w, gw - 1)] = True
    if dilate:
        cells = ndi.binary_dilation(cells, iterations=dilate)
    return cells


def _merge_fixes(fixes: list[Fix]) -> list[Fix]:
    """One fix per attribute; the first (from the costliest finding) wins."""
    merged: dict[str, Fix] = {}
    for fix in fixes:
        merged.setdefault(fix.attribute, fix)
    return list(merged.values())

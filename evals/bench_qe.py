"""Benchmark of QE's metric judge: does its score separate good edits from each way an edit goes wrong?

Run: ``python -m evals.bench_qe [--per-kind 200] [--size 160] [--split test]``.

Good edits are the embedded engine's defaults (PG's instruction for every MVTec-AD and VisA type, drawn
by IG) on the bundled sample images. Bad edits start from a good one and break it in one way:

* off_object: the same instruction drawn on the background or straddling the object's outline;
* invisible: the change scaled down to 3–20% of its strength;
* garish: the change recoloured in a saturated primary, or amplified 3–6x;
* seamed: a hard-edged flat "sticker" of the defect's mean colour, a hard-edged patch cut from elsewhere
  with a brightness offset, or a soft-edged defect composited with a binary alpha;
* oversized: the change enlarged 2.5–4x about its centre;
* outside: the good edit plus a global change (brightness, colour cast, contrast, blur or noise);
* camera: the camera's fingerprint changed inside the defect only: denoised or blurred, extra noise, or
  (on JPEG inputs) its blocks recompressed at a much lower quality;
* flat: on a textured surface, the defect's inside replaced by its smooth tone plus noise at the
  image's estimated level (the texture gone, the noise kept, the edge soft).

Normal images are stored as a camera would store them: a third as rendered, a third with sensor noise
(std 1.5-4 levels), a third with that noise and then JPEG at quality 60-90 (the engine is told the
quality, as the graph tells it when the input file is a JPEG).

The table gives, per kind, the AUROC of the judge's total score (location + quality) for good vs that
kind, and the share of each that passes; the last line is the overall AUROC (good vs all bad).

Honesty: the judge's thresholds were set on the "calibration" split (seeds from 0, sample images 0-1);
the default "test" split uses other seeds and other sample images (2-3), never looked at while tuning.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

KINDS = ("off_object", "invisible", "garish", "seamed", "oversized", "outside", "camera", "flat")
SPLITS = {"calibration": (0, (0, 1)), "test": (100_000, (2, 3))}

_GARISH = np.array([[255, 0, 0], [0, 255, 0], [255, 0, 255], [255, 255, 0], [0, 0, 255], [255, 110, 0]], np.float32)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _change(normal: np.ndarray, edited: np.ndarray) -> np.ndarray:
    return edited.astype(np.float32) - normal.astype(np.float32)


def _strength(delta: np.ndarray) -> np.ndarray:
    """Relative strength 0..1 of a change per pixel (max over channels, over its 95th percentile)."""
    mag = np.abs(delta).max(axis=2)
    ref = float(np.percentile(mag[mag > 2], 95)) if (mag > 2).any() else 1.0
    return np.clip(mag / max(ref, 1.0), 0, 1)


# ------------------------------------------------------------------------------------------ breakers


def off_object(ctx, rng: np.random.Generator) -> np.ndarray | None:
    """The same instruction drawn on the background, or on a band straddling the object's outline."""
    if ctx.is_texture:
        return None
    fg = ctx.engine.foreground(ctx.normal, False)
    if rng.random() < 0.5:
        area = ~ndi.binary_dilation(fg, iterations=3)
    else:
        width = max(3, int(0.06 * np.sqrt(fg.sum())))
        area = ndi.binary_dilation(fg, iterations=width) & ~ndi.binary_erosion(fg, iterations=width)
        area &= ~fg | (rng.random() < 0.5)
    if area.sum() < 50:
        return None
    from tools.types import GenerationRequest

    req = GenerationRequest(prompt=ctx.prompt, category=ctx.category, anomaly_type=ctx.anomaly_type,
                            is_texture=False, default_shape=ctx.shape, region=None, seed=int(rng.integers(1 << 30)))
    return ctx.engine.generate(ctx.normal, req, foreground=area).image


def invisible(ctx, rng: np.random.Generator) -> np.ndarray:
    """The change scaled down to near zero contrast: 3–20% of its strength and at most 3–9 levels."""
    delta = _change(ctx.normal, ctx.edited)
    mag = np.abs(delta).max(axis=2)
    top = float(np.percentile(mag[mag > 2], 90)) if (mag > 2).any() else 1.0
    return _u8(ctx.normal + delta * min(rng.uniform(0.03, 0.2), rng.uniform(3, 9) / max(top, 1.0)))


def garish(ctx, rng: np.random.Generator) -> np.ndarray:
    """The defect recoloured in a saturated primary, or its change amplified 3–6x and to 150+ levels."""
    delta = _change(ctx.normal, ctx.edited)
    if rng.random() < 0.6:
        a = ndi.gaussian_filter(_strength(delta), 0.7)[..., None] * rng.uniform(0.85, 1.0)
        colour = _GARISH[int(rng.integers(len(_GARISH)))]
        return _u8(ctx.normal * (1 - a) + colour * a)
    mag = np.abs(delta).max(axis=2)
    top = float(np.percentile(mag[mag > 2], 90)) if (mag > 2).any() else 1.0
    return _u8(ctx.normal + delta * max(rng.uniform(3.0, 6.0), rng.uniform(150, 230) / max(top, 1.0)))


def seamed(ctx, rng: np.random.Generator) -> np.ndarray | None:
    """A hard-edged sticker, a hard-edged patch from elsewhere, or the defect with a binary alpha."""
    region = ctx.region
    if region.sum() < 12:
        return None
    normal = ctx.normal.astype(np.float32)
    choice = rng.random()
    if choice < 0.35:
        # Flat sticker: the defect's mean colour, hard edge.
        area = ndi.binary_dilation(region, iterations=1)
        out = normal.copy()
        out[area] = ctx.edited[area].astype(np.float32).mean(axis=0) + rng.normal(0, 1.0, (int(area.sum()), 3))
        return _u8(out)
    if choice < 0.7:
        # A patch of the image from elsewhere, brightness-shifted, pasted with a hard edge.
        area = ndi.binary_dilation(region, iterations=int(rng.integers(1, 4)))
        if area.sum() < 40:
            area = ndi.binary_dilation(area, iterations=3)
        h, w = area.shape
        ys, xs = np.nonzero(area)
        span = max(np.ptp(ys), np.ptp(xs)) + 1
        for _ in range(20):
            dy, dx = (int(v) for v in rng.integers(-h // 2, h // 2, 2))
            if max(abs(dy), abs(dx)) >= span:
                break
        src = np.roll(normal, (dy, dx), axis=(0, 1))
        shift = rng.choice([-1, 1]) * rng.uniform(18, 40)
        out = normal.copy()
        out[area] = src[area] + shift
        return _u8(out)
    # Binary alpha: wherever the change is at least a fifth of its strength, apply it in full.
    delta = _change(ctx.normal, ctx.edited)
    a = _strength(delta)
    hard = a >= 0.2
    if hard.sum() < 12:
        return None
    scale = np.where(hard, 1.0 / np.maximum(a, 0.35), 0.0)[..., None]
    return _u8(normal + delta * scale)


def oversized(ctx, rng: np.random.Generator) -> np.ndarray:
    """The change enlarged about its centre, at least 2.5x and to half the object's size or more."""
    delta = _change(ctx.normal, ctx.edited)
    region = ctx.region if ctx.region.any() else np.abs(delta).max(axis=2) > 2
    ys, xs = np.nonzero(region)
    cy, cx = float(ys.mean()), float(xs.mean())
    fg = ctx.engine.foreground(ctx.normal, ctx.is_texture)
    diameter = 2.0 * np.sqrt(fg.sum() / np.pi)
    extent = max(np.ptp(ys), np.ptp(xs)) + 1.0
    z = max(2.5, rng.uniform(0.5, 0.9) * diameter / extent)
    # Map output pixel p to input (p - c) / z + c.
    big = np.stack([
        ndi.affine_transform(delta[..., c], np.diag([1 / z, 1 / z]), offset=(cy - cy / z, cx - cx / z), order=1)
        for c in range(3)
    ], axis=2)
    big *= ndi.gaussian_filter(fg.astype(np.float32), 1.0)[..., None]
    return _u8(ctx.normal + big)


def outside(ctx, rng: np.random.Generator) -> np.ndarray:
    """The good edit plus a global change elsewhere in the image."""
    img = ctx.edited.astype(np.float32)
    kind = int(rng.integers(5))
    if kind == 0:
        img = img + rng.choice([-1, 1]) * rng.uniform(6, 15)
    elif kind == 1:
        img = img + rng.choice([-1, 1], 3) * rng.uniform(5, 12, 3)
    elif kind == 2:
        m = img.mean(axis=(0, 1))
        img = (img - m) * rng.uniform(1.12, 1.3) + m
    elif kind == 3:
        img = ndi.gaussian_filter(img, (rng.uniform(0.8, 1.6),) * 2 + (0,))
    else:
        img = img + rng.normal(0, rng.uniform(3, 6), img.shape)
    return _u8(img)


def camera(ctx, rng: np.random.Generator) -> np.ndarray | None:
    """The good edit with the camera's fingerprint changed inside the defect only (None on an image with
    no measurable noise or compression: there is nothing to change)."""
    from tools.image_gen.camera import estimate_noise

    region = ndi.binary_dilation(ctx.region, iterations=1)
    if ndi.binary_erosion(ctx.region, iterations=1).sum() < 20 or (ctx.jpeg_quality is None and estimate_noise(ctx.normal) < 1.0):
        return None
    edited = ctx.edited.astype(np.float32)
    alpha = ndi.gaussian_filter(region.astype(np.float32), 0.7)[..., None]
    choice = rng.random()
    if ctx.jpeg_quality is not None and choice < 0.4:
        from tools.image_gen.camera import JpegSettings, jpeg_roundtrip

        worse = jpeg_roundtrip(ctx.edited, JpegSettings(quality=max(5, ctx.jpeg_quality // int(rng.integers(3, 6)))))
        return _u8(edited * (1 - alpha) + worse.astype(np.float32) * alpha)
    if choice < 0.7:
        smooth = ndi.gaussian_filter(edited, (rng.uniform(1.0, 1.8),) * 2 + (0,))
        return _u8(edited * (1 - alpha) + smooth * alpha)
    noise = rng.normal(0, max(ctx.noise, 1.5) * rng.uniform(1.5, 2.5), edited.shape[:2])[..., None]
    return _u8(edited + noise * alpha)


def flat(ctx, rng: np.random.Generator) -> np.ndarray | None:
    """On a textured surface: the defect's inside as its smooth tone plus noise of the image's level."""
    region = ctx.region
    if ndi.binary_erosion(region, iterations=2).sum() < 30:
        return None
    normal = ctx.normal.astype(np.float32)
    luma = normal @ np.array([0.299, 0.587, 0.114], np.float32)
    ring = ndi.binary_dilation(region, iterations=7) & ~ndi.binary_dilation(region, iterations=2)
    texture = luma - ndi.gaussian_filter(luma, 1.5)
    if ring.sum() < 20 or 1.4826 * np.median(np.abs(texture[ring])) < 3.0:
        return None
    edited = ctx.edited.astype(np.float32)
    area = region.astype(np.float32)
    tone = ndi.gaussian_filter(edited * area[..., None], (4, 4, 0)) / np.maximum(ndi.gaussian_filter(area, 4), 1e-3)[..., None]
    from tools.image_gen.camera import estimate_noise

    grain = rng.normal(0, max(estimate_noise(ctx.normal), 0.5), normal.shape[:2])[..., None]
    alpha = ndi.gaussian_filter(area, rng.uniform(0.8, 1.5))[..., None]
    return _u8(edited * (1 - alpha) + (tone + grain) * alpha)


BREAKERS: dict[str, Callable] = {
    "off_object": off_object,
    "invisible": invisible,
    "garish": garish,
    "seamed": seamed,
    "oversized": oversized,
    "outside": outside,
    "camera": camera,
    "flat": flat,
}


# ------------------------------------------------------------------------------------------ the run


class _Ctx:
    """One good edit and what the breakers need to know about it."""

    def __init__(self, engine, syn, normal, jpeg_quality: int | None = None, noise: float = 0.0) -> None:
        self.engine = engine
        self.normal = normal
        self.edited = syn.result.image
        self.region = syn.result.region
        self.prompt = syn.prompt
        self.category = syn.category
        self.anomaly_type = syn.anomaly_type
        self.shape = syn.entry.shape
        self.is_texture = syn.is_texture
        self.jpeg_quality = jpeg_quality
        self.noise = noise


def stored(normal: np.ndarray, index: int, rng: np.random.Generator) -> tuple[np.ndarray, int | None, float]:
    """`normal` as a camera stores it (by `index` mod 3: as rendered, with sensor noise, noisy then JPEG):
    the image, its JPEG quality (None for PNG) and the noise std added."""
    if index % 3 == 0:
        return normal, None, 0.0
    sigma = float(rng.uniform(1.5, 4.0))
    noisy = _u8(normal.astype(np.float32) + rng.normal(0, sigma, normal.shape[:2])[..., None])
    if index % 3 == 1:
        return noisy, None, sigma
    from tools.image_gen.camera import JpegSettings, jpeg_roundtrip

    quality = int(rng.integers(60, 91))
    return jpeg_roundtrip(noisy, JpegSettings(quality=quality)), quality, sigma


#: A draw is visible when its typical luma change (75th percentile over the engine's own region, the
#: engine's and MG's convention) reaches this many grey levels and this multiple of the luma spread in a
#: ring around it: signal at least the surface's own variation (independent of QE's measures).
VISIBLE_LEVELS, VISIBLE_VS_SURFACE = 5.0, 1.0


def visible(normal: np.ndarray, edited: np.ndarray, region: np.ndarray) -> bool:
    """Whether a draw changes its region by more than the surface around it varies (the bench's oracle
    for which engine draws count as good: fainter ones are label noise for a detector)."""
    if region.sum() < 4:
        return False
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    luma_n, luma_e = normal.astype(np.float32) @ weights, edited.astype(np.float32) @ weights
    ring = ndi.binary_dilation(region, iterations=6) & ~ndi.binary_dilation(region, iterations=2)
    change = float(np.percentile(np.abs(luma_e - luma_n)[region], 75))
    return change >= VISIBLE_LEVELS and change >= VISIBLE_VS_SURFACE * float(np.std(luma_n[ring]))


def build_cases(per_kind: int, size: int, split: str, keep_faint: bool = False,
                tally: dict | None = None) -> list[tuple[str, dict, np.ndarray, np.ndarray]]:
    """(label, request fields, normal, edited) for `per_kind` good edits and as many bad ones of each kind.

    The good edits are the engine's draws for PG's instruction; draws below the visibility oracle
    (`visible`) are left out of every class unless `keep_faint`, and counted in `tally` ("draws", "faint").
    """
    from evals.synth import normal_for, sample_category_for, synthesize
    from tools.image_gen import ProceduralEngine
    from tools.knowledge.catalog import load_catalog
    from tools.prompt_gen import TemplatePromptGenerator

    seed0, indices = SPLITS[split]
    engine, pg = ProceduralEngine(), TemplatePromptGenerator()
    pairs = load_catalog().pairs()
    rng = np.random.default_rng(seed0 + 7)
    counts: dict[str, int] = defaultdict(int)
    cases = []
    normals: dict[tuple[str, int, int], tuple[np.ndarray, int | None, float]] = {}
    k = 0
    while min(counts[kind] for kind in ("good", *KINDS)) < per_kind:
        category, anomaly_type = pairs[k % len(pairs)]
        index = indices[(k // len(pairs)) % len(indices)]
        storage = (k // (len(pairs) * len(indices)) + k) % 3
        skey = (sample_category_for(category, index), index, storage)
        if skey not in normals:
            normals[skey] = stored(normal_for(category, index, size=size, seed=seed0), storage,
                                   np.random.default_rng([seed0, index, storage]))
        normal, quality, noise = normals[skey]
        syn = synthesize(engine, pg, category, anomaly_type, normal, seed=seed0 + k, jpeg_quality=quality)
        k += 1
        if tally is not None:
            tally["draws"] = tally.get("draws", 0) + 1
        if not keep_faint and not visible(normal, syn.result.image, syn.result.region):
            if tally is not None:
                tally["faint"] = tally.get("faint", 0) + 1
            continue
        ctx = _Ctx(engine, syn, normal, quality, noise)
        fields = {"category": syn.category, "anomaly_type": syn.anomaly_type, "prompt": syn.prompt, "is_texture": syn.is_texture}
        if counts["good"] < per_kind:
            cases.append(("good", fields, normal, syn.result.image))
            counts["good"] += 1
        for kind in KINDS:
            if counts[kind] >= per_kind:
                continue
            bad = BREAKERS[kind](ctx, rng)
            if bad is not None and not np.array_equal(bad, normal):
                cases.append((kind, fields, normal, bad))
                counts[kind] += 1
    return cases


def run(per_kind: int = 200, size: int = 160, split: str = "test", judge=None, out=sys.stdout,
        keep_faint: bool = False) -> dict:
    """Build the cases, judge them, print the table; return the numbers."""
    from sklearn.metrics import roc_auc_score

    from tools.quality_eval import MetricJudge
    from tools.types import EvaluationRequest

    judge = judge or MetricJudge()
    started = time.perf_counter()
    tally: dict = {}
    cases = build_cases(per_kind, size, split, keep_faint, tally)
    built = time.perf_counter()
    scores: dict[str, list[float]] = defaultdict(list)
    passed: dict[str, list[bool]] = defaultdict(list)
    records = []
    times = []
    for label, fields, normal, edited in cases:
        t0 = time.perf_counter()
        ev = judge.evaluate(normal, edited, EvaluationRequest(**fields))
        times.append(time.perf_counter() - t0)
        scores[label].append(ev.score)
        passed[label].append(ev.passed)
        records.append((label, fields, ev))
    good = scores["good"]
    rows = {}
    print(f"QE metric judge on {len(cases)} edits ({split} split, {size} px): AUROC of location+quality, good vs each kind",
          file=out)
    print(f"{'kind':<12} {'n':>5} {'AUROC':>7} {'pass%':>7} {'mean score':>11}  most named fix (share of failed)", file=out)
    print(f"{'good':<12} {len(good):>5} {'':>7} {100 * np.mean(passed['good']):>6.1f}% {statistics.fmean(good):>11.2f}", file=out)
    all_bad: list[float] = []
    for kind in KINDS:
        bad = scores[kind]
        all_bad += bad
        auc = roc_auc_score([1] * len(good) + [0] * len(bad), good + bad)
        rows[kind] = auc
        print(f"{kind:<12} {len(bad):>5} {auc:>7.3f} {100 * np.mean(passed[kind]):>6.1f}% {statistics.fmean(bad):>11.2f}  "
              f"{_top_fix([ev for label, _, ev in records if label == kind and not ev.passed])}", file=out)
    overall = roc_auc_score([1] * len(good) + [0] * len(all_bad), good + all_bad)
    print(f"build {built - started:.1f} s, judge {1000 * statistics.median(times):.1f} ms/edit median "
          f"({sum(times):.1f} s total)", file=out)
    if not keep_faint:
        print(f"engine draws below the visibility oracle, left out: {tally.get('faint', 0)} of {tally['draws']} "
              f"({100 * tally.get('faint', 0) / tally['draws']:.1f}%)", file=out)
    print(f"QE AUROC {overall:.3f}", file=out)
    return {"auroc": overall, "per_kind": rows, "records": records, "pass_good": float(np.mean(passed["good"]))}


def _top_fix(verdicts: list) -> str:
    """The fix most failed verdicts name, with the share of them that name it."""
    named: dict[str, int] = defaultdict(int)
    for ev in verdicts:
        for fix in ev.fixes:
            named[f"{fix.attribute}={fix.value}"] += 1
    if not named:
        return "-"
    top = max(named, key=named.get)
    return f"{top} ({100 * named[top] / len(verdicts):.0f}%)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_qe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=200, help="good edits and bad edits of each kind (default 200)")
    parser.add_argument("--size", type=int, default=160, help="image side in pixels (default 160)")
    parser.add_argument("--split", choices=sorted(SPLITS), default="test",
                        help="test (held-out seeds and images, the default) or calibration (what the thresholds were set on)")
    parser.add_argument("--keep-faint", action="store_true",
                        help="count the engine's draws below the visibility oracle as good edits too")
    args = parser.parse_args(argv)
    run(args.per_kind, args.size, args.split, keep_faint=args.keep_faint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

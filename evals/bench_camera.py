"""Benchmark of camera consistency: does the defect carry the input's own noise, blur and compression?

Run: ``anomaly-agent bench camera [--per-family 24] [--size 256]`` (or ``python -m evals.bench_camera``).

Inputs are the bundled sample images of every sample category made camera-like: blurred by a lens
(Gaussian, 0.4-1.2 px), with sensor noise (Gaussian, 2-6 levels) and stored as PNG, or additionally as
JPEG (quality 70-95, 4:2:0 or 4:4:4; the JPEG's settings reach the engine as they do in a run). The
embedded engine draws every family on them, with no size/contrast/softness word (the broad
distribution). Per defect:

* residual ratio: the noise level (robust MAD spread of the finest diagonal wavelet band of the luma,
  Donoho's estimator, on pixels no more structured than the ring's) inside the engine's region over a
  ring just outside it (`tools.image_gen.camera.residual_ratio`; n counts the defects it could measure); shown beside it, not judged, the same ratio for the
  Gaussian 1-px high-pass residual (`highpass_ratio`), which also holds the defect's own fine structure;
* blockiness ratio (JPEG inputs): the 8-px block-boundary step inside over the ring's;
* MG IoU: the change mask (MG's fallback for backends that do not know their region) against the region.

The table gives the medians per family; the last line says whether every family's median residual
ratio (and blockiness ratio on JPEG) lies within [0.8, 1.25].
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
from collections import defaultdict

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Shapes drawn per family (objects and textures; "missing" only on objects, where it applies).
FAMILY_SHAPES: dict[str, tuple[str, ...]] = {
    "line": ("scratch", "crack", "thread", "cut"),
    "blob": ("stain", "contamination", "discoloration", "rough"),
    "hole": ("hole", "pit", "dent"),
    "missing": ("missing", "chip"),
    "deformation": ("bent", "squeeze", "fold"),
    "texture": ("texture",),
}
TARGET = (0.8, 1.25)


def camera_image(category: str, index: int, rng: np.random.Generator, size: int, jpeg: bool):
    """A sample image as a camera would deliver it: (uint8 RGB, JPEG settings or None)."""
    from tools.image_gen.camera import jpeg_settings
    from tools.samples import sample_image

    img = sample_image(category, index, size=size).astype(np.float32)
    img = ndi.gaussian_filter(img, (float(rng.uniform(0.4, 1.2)),) * 2 + (0,))
    img = img + rng.normal(0.0, float(rng.uniform(2.0, 6.0)), img.shape)
    arr = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if not jpeg:
        return arr, None
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(70, 96)), subsampling=int(rng.choice([0, 2])))
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")), jpeg_settings(data)


def run(per_family: int, size: int, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    from tools.image_gen import ProceduralEngine
    from tools.image_gen.camera import blockiness_ratio, highpass_ratio, residual_ratio
    from tools.mask_gen import change_mask
    from tools.samples import SAMPLE_CATEGORIES
    from tools.types import GenerationRequest

    engine = ProceduralEngine()
    cats = list(SAMPLE_CATEGORIES)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for fmt in ("png", "jpeg"):
        rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        rng = np.random.default_rng([seed, 1 if fmt == "jpeg" else 0])
        for family, shapes in FAMILY_SHAPES.items():
            usable = [c for c in cats if family != "missing" or SAMPLE_CATEGORIES[c] == "object"]
            for k in range(per_family):
                category = usable[k % len(usable)]
                shape = shapes[k % len(shapes)]
                image, settings = camera_image(category, k % 4, rng, size, fmt == "jpeg")
                request = GenerationRequest(
                    prompt=f"Add one {shape}",
                    category=category,
                    anomaly_type=shape,
                    is_texture=SAMPLE_CATEGORIES[category] == "texture",
                    default_shape=shape,
                    seed=seed * 100_000 + k,
                    jpeg_quality=settings.quality if settings else None,
                    jpeg_subsampling=settings.subsampling if settings else 2,
                )
                result = engine.generate(image, request)
                region = result.region
                if region is None or not region.any():
                    rows[family]["empty"].append(1.0)
                    continue
                ratio = residual_ratio(result.image, region)
                if ratio is not None:
                    rows[family]["residual"].append(ratio)
                hp = highpass_ratio(result.image, region)
                if hp is not None:
                    rows[family]["highpass"].append(hp)
                if fmt == "jpeg":
                    block = blockiness_ratio(result.image, region)
                    if block is not None:
                        rows[family]["blockiness"].append(block)
                mask = change_mask(image, result.image).mask
                union = (mask | region).sum()
                rows[family]["mg_iou"].append(float((mask & region).sum() / union) if union else 1.0)
        results[fmt] = {
            fam: {name: float(statistics.median(v)) for name, v in vals.items() if name != "empty"}
            | {"n": float(len(vals.get("residual", []))), "empty": float(len(vals.get("empty", [])))}
            for fam, vals in rows.items()
        }
    return results


def report(results: dict[str, dict[str, dict[str, float]]]) -> tuple[str, bool]:
    """The table and whether every family's medians lie within `TARGET`."""
    lines = ["| input | family | n | noise ratio (median) | blockiness ratio (median) | Gaussian high-pass ratio (median, not judged) | MG change-mask IoU (median) | empty |",
             "|---|---|---|---|---|---|---|---|"]
    ok = True
    for fmt, fams in results.items():
        for fam, v in fams.items():
            res = v.get("residual", float("nan"))
            block = v.get("blockiness")
            inside = TARGET[0] <= res <= TARGET[1] and (block is None or TARGET[0] <= block <= TARGET[1])
            ok &= inside
            lines.append(
                f"| {fmt} | {fam} | {int(v['n'])} | {res:.3f} | {'' if block is None else f'{block:.3f}'} | "
                f"{v.get('highpass', float('nan')):.3f} | {v.get('mg_iou', float('nan')):.3f} | {int(v['empty'])} |"
                + ("" if inside else " **outside**")
            )
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench camera", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-family", type=int, default=24, help="defects per family and input format (default 24)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    table, ok = report(run(args.per_family, args.size, args.seed))
    print(table)
    print(f"camera consistency: every family's median ratio within [{TARGET[0]}, {TARGET[1]}]: {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

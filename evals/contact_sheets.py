"""Contact sheets of the embedded IG engine: one per defect family and one per MVTec-AD category.

Run: ``anomaly-agent bench contact-sheets OUT_DIR [--size 256] [--per-type 1] [--seed 0]``.

Each row is one sample: normal | anomaly | zoom on the defect | MG mask, with the type, family, the
instruction's words, QE's score and the mask IoU against the engine's region. The zoom is there because
at inspection scale a defect is small, and realism is judged up close. Writes ``family_<name>.png`` and
``mvtec_<category>.png`` into OUT_DIR (split into ``_1``, ``_2``... when longer than ``--rows``).
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _zoom(image: np.ndarray, region: np.ndarray, side: int) -> np.ndarray:
    """A square crop around `region` (a third of the image at least), scaled to `side`."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    cy, cx = (ys.mean(), xs.mean()) if ys.size else (h / 2, w / 2)
    extent = max(np.ptp(ys), np.ptp(xs)) if ys.size else 0
    half = int(max(min(h, w) / 6, 0.7 * extent + 6))
    half = min(half, min(h, w) // 2)
    y0 = int(np.clip(cy - half, 0, h - 2 * half))
    x0 = int(np.clip(cx - half, 0, w - 2 * half))
    crop = image[y0 : y0 + 2 * half, x0 : x0 + 2 * half]
    return np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.NEAREST))


def render_sheet(rows: list[tuple[list[np.ndarray], str]], path: Path, thumb: int = 192, label_width: int = 360) -> Path:
    """Write rows of images (each resized to `thumb`) with a text label on the right, as one PNG."""
    pad = 4
    ncol = max(len(images) for images, _ in rows)
    width = ncol * (thumb + pad) + pad + label_width
    height = len(rows) * (thumb + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (images, label) in enumerate(rows):
        y = pad + r * (thumb + pad)
        for c, img in enumerate(images):
            if img.dtype == bool:
                img = (img * 255).astype(np.uint8)
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            tile = Image.fromarray(img).resize((thumb, thumb), Image.Resampling.LANCZOS)
            sheet.paste(tile, (pad + c * (thumb + pad), y))
        for i, line in enumerate(label.split("\n")):
            draw.text((ncol * (thumb + pad) + pad, y + 8 + 14 * i), line, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _wrap(text: str, width: int = 56) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def build_rows(pairs: list[tuple[str, str]], size: int, per_type: int, seed: int) -> list[tuple[str, str, list, str]]:
    """(category, type, images, label) for each pair and sample index."""
    from evals.synth import normal_for, synthesize
    from tools.image_gen import ProceduralEngine
    from tools.mask_gen import change_mask
    from tools.prompt_gen import TemplatePromptGenerator
    from tools.quality_eval import MetricJudge
    from tools.types import EvaluationRequest

    engine, pg, judge = ProceduralEngine(), TemplatePromptGenerator(), MetricJudge()
    out = []
    for k, (category, anomaly_type) in enumerate(pairs):
        for i in range(per_type):
            normal = normal_for(category, i, size=size, seed=seed)
            s = synthesize(engine, pg, category, anomaly_type, normal, seed=seed * 1000 + k * 10 + i)
            mask = change_mask(normal, s.result.image).mask
            region = s.result.region
            union = (mask | region).sum()
            iou = (mask & region).sum() / union if union else 1.0
            ev = judge.evaluate(normal, s.result.image, EvaluationRequest(
                category=category, anomaly_type=anomaly_type, prompt=s.prompt, is_texture=s.is_texture))
            spec = s.result.spec
            words = f"{spec.size} {spec.contrast} {spec.colour} {spec.shape} {spec.softness} @{s.result.info['position']}"
            label = (
                f"{category}/{anomaly_type} [{s.entry.family}]\n{words}\n"
                f"QE {ev.location:.1f}+{ev.quality:.1f} {'PASS' if ev.passed else 'FAIL'}  IoU {iou:.2f}\n"
                + _wrap(ev.review.split('Fixes:')[0], 56)
            )
            images = [normal, s.result.image, _zoom(s.result.image, region | mask, size), mask]
            out.append((category, anomaly_type, images, s.entry.family, label))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="contact_sheets", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the PNG sheets")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--per-type", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["family", "mvtec", "both"], default="both")
    parser.add_argument("--rows", type=int, default=8, help="rows per sheet (default 8)")
    args = parser.parse_args(argv)
    from tools.knowledge.catalog import load_catalog

    catalog = load_catalog()
    rows = build_rows(catalog.pairs(), args.size, args.per_type, args.seed)
    by_family: dict[str, list] = defaultdict(list)
    by_category: dict[str, list] = defaultdict(list)
    mvtec = {c.name for c in catalog.categories("mvtec_ad")}
    for category, _, images, family, label in rows:
        by_family[family].append((images, label))
        if category in mvtec:
            by_category[category].append((images, label))
    written = []

    def pages(name: str, rows_: list) -> None:
        # At most `--rows` rows per sheet, so that a sheet stays readable at full size.
        for page in range(0, len(rows_), args.rows):
            suffix = f"_{page // args.rows + 1}" if len(rows_) > args.rows else ""
            written.append(render_sheet(rows_[page : page + args.rows], args.out / f"{name}{suffix}.png"))

    if args.only in ("family", "both"):
        for family, frows in sorted(by_family.items()):
            pages(f"family_{family}", frows)
    if args.only in ("mvtec", "both"):
        for category, crows in sorted(by_category.items()):
            pages(f"mvtec_{category}", crows)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark of appearance diversity inside each defect type.

Run: ``anomaly-agent bench diversity [--per-type 40] [--categories carpet,tile,wood,metal_nut,capsule]``
(or ``python -m evals.bench_diversity``).

For every type of each category (its knowledge entry, PG's instruction for a seed, the embedded engine on
the category's bundled sample images), the masks' distributions: 5th/50th/95th percentiles of

* area: the mask's share of the image;
* contrast: the mean absolute luma change inside the mask, in grey levels;
* irregularity: 1 - area / convex-hull area of the mask (0 for a convex shape; ragged or branched
  outlines score higher).

A type passes the must-show when its area spans at least two decades between p5 and p95 (p95/p5 ≥ 100)
and its contrast reaches below 15 grey levels at p5. The last line names the types that fail.
Optional ``--sheets DIR`` writes one contact sheet per category (normal | anomaly | mask) to look at.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_CATEGORIES = ("carpet", "tile", "wood", "metal_nut", "capsule")
AREA_SPAN = 100.0
CONTRAST_P5 = 15.0


def irregularity(mask: np.ndarray) -> float:
    """1 - area / convex-hull area (0 for a convex mask)."""
    from skimage.morphology import convex_hull_image

    if mask.sum() < 3:
        return 0.0
    hull = convex_hull_image(mask)
    return float(1.0 - mask.sum() / max(hull.sum(), 1))


def measure(normal: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Area share, mean absolute luma change inside, and irregularity of one mask."""
    from tools.image_gen.camera import luminance

    change = np.abs(luminance(edited) - luminance(normal))
    return {
        "area": float(mask.mean()),
        "contrast": float(change[mask].mean()) if mask.any() else 0.0,
        "irregularity": irregularity(mask),
    }


def run(categories: list[str], per_type: int, size: int, seed: int = 0, sheets: Path | None = None) -> list[dict]:
    from tools.contact_sheet import SheetRow, make_contact_sheet
    from tools.image_gen import ProceduralEngine
    from tools.imaging import save_png_atomic
    from tools.knowledge.catalog import load_catalog
    from tools.prompt_gen import TemplatePromptGenerator
    from tools.samples import sample_image
    from tools.types import GenerationRequest, PromptRequest

    catalog = load_catalog()
    engine = ProceduralEngine()
    pg = TemplatePromptGenerator()
    images = {c: [sample_image(c, i, size=size) for i in range(4)] for c in categories}
    rows: list[dict] = []
    for category in categories:
        cat = catalog.category(category)
        sheet_rows: list = []
        for name, defect in cat.defects.items():
            entry = catalog.entry(category, name)
            values: dict[str, list[float]] = {"area": [], "contrast": [], "irregularity": []}
            empty = 0
            for k in range(per_type):
                s = seed * 1_000_003 + k
                prompt = pg.generate(
                    PromptRequest(category=category, anomaly_type=name, subject=cat.subject, knowledge=[entry], seed=s)
                )
                normal = images[category][k % 4]
                request = GenerationRequest(
                    prompt=prompt,
                    category=category,
                    anomaly_type=name,
                    is_texture=cat.is_texture,
                    default_shape=defect.shape,
                    region=defect.region,
                    seed=s,
                )
                result = engine.generate(normal, request)
                if result.region is None or not result.region.any():
                    empty += 1
                    continue
                for key, v in measure(normal, result.image, result.region).items():
                    values[key].append(v)
                if sheets is not None and k < 4:
                    d = sheets / "tiles" / category
                    stem = f"{name}_{k}"
                    n_path = save_png_atomic(normal, d / f"{stem}_n.png")
                    a_path = save_png_atomic(result.image, d / f"{stem}_a.png")
                    m_path = save_png_atomic((result.region * 255).astype(np.uint8), d / f"{stem}_m.png")
                    look = result.info["defects"][0].get("look", {})
                    label = f"{name} {defect.family}: {prompt[4:60]} | c={look.get('contrast', '?')}"
                    sheet_rows.append(SheetRow(str(n_path), str(a_path), str(m_path), label))
            row = {"category": category, "type": name, "family": defect.family, "n": len(values["area"]), "empty": empty}
            for key, vs in values.items():
                q = np.percentile(vs, [5, 50, 95]) if vs else [np.nan] * 3
                row[key] = [float(x) for x in q]
            area = row["area"]
            row["area_span"] = float(area[2] / area[0]) if area[0] > 0 else float("inf")
            row["passes"] = bool(row["area_span"] >= AREA_SPAN and row["contrast"][0] < CONTRAST_P5)
            rows.append(row)
        if sheets is not None and sheet_rows:
            make_contact_sheet(sheet_rows, sheets / f"diversity_{category}.png", thumb=192, label_width=520)
    return rows


def report(rows: list[dict]) -> str:
    lines = [
        "| category | type | family | n | area % p5 / p50 / p95 | span p95/p5 | contrast p5 / p50 / p95 | irregularity p5 / p50 / p95 | must-show |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, c, i = r["area"], r["contrast"], r["irregularity"]
        lines.append(
            f"| {r['category']} | {r['type']} | {r['family']} | {r['n']} | "
            f"{100 * a[0]:.3f} / {100 * a[1]:.3f} / {100 * a[2]:.2f} | {r['area_span']:.0f} | "
            f"{c[0]:.1f} / {c[1]:.1f} / {c[2]:.1f} | {i[0]:.2f} / {i[1]:.2f} / {i[2]:.2f} | "
            f"{'pass' if r['passes'] else 'FAIL'} |"
        )
    failing = [f"{r['category']}/{r['type']}" for r in rows if not r["passes"]]
    lines.append("")
    lines.append(
        f"diversity: {len(rows) - len(failing)}/{len(rows)} types pass (area p95/p5 >= {AREA_SPAN:.0f}, "
        f"contrast p5 < {CONTRAST_P5:.0f}); failing: {', '.join(failing) if failing else 'none'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench diversity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-type", type=int, default=40, help="defects per type (default 40)")
    parser.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES), help="comma-separated sample categories")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheets", type=Path, help="write one contact sheet per category into this folder")
    args = parser.parse_args(argv)
    cats = [c.strip() for c in args.categories.split(",") if c.strip()]
    print(report(run(cats, args.per_type, args.size, args.seed, args.sheets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small anomaly dataset in MVTec layout, made offline: sample normals plus procedural defects as "real" ones.

Why: reverse synthesis reads a real anomaly dataset (MVTec-AD, VisA), which cannot ship with the
project. Tests and the SFT data script need one all the same; this writes the same layout from the
sample images (`tools.samples`) and the embedded IG engine, whose changed region is the ground-truth
mask. Normals go to train/good, so reverse synthesis finds each anomaly's own normal ("paired").
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tools.dataset_layout import mvtec_anomaly_path, mvtec_mask_path

logger = logging.getLogger(__name__)


def build_mvtec_like(
    root: Path,
    types: dict[str, list[str]],
    *,
    per_type: int = 2,
    size: int = 128,
    seed: int = 0,
) -> list[Path]:
    """Write ROOT/C/train/good/NNN.png, ROOT/C/test/T/NNN.png and ROOT/C/ground_truth/T/NNN_mask.png.

    Args:
        root: Dataset root (created).
        types: Category -> defect types (sample categories: tile, carpet, wood, metal_nut, capsule).
        per_type: Anomalies per (category, type); each on its own normal image.
        size: Image side in pixels.
        seed: Seed of the normals (`tools.samples.sample_image`) and of the defects.

    Returns:
        The anomaly image paths written.
    """
    from tools.image_gen.engine import ProceduralEngine
    from tools.imaging import save_png_atomic
    from tools.knowledge.catalog import load_catalog
    from tools.prompt_gen import TemplatePromptGenerator
    from tools.samples import sample_image
    from tools.types import GenerationRequest, PromptRequest

    catalog = load_catalog()
    engine = ProceduralEngine()
    writer = TemplatePromptGenerator()
    written: list[Path] = []
    for category, names in types.items():
        entry_category = catalog.category(category)
        index = 0
        for anomaly_type in names:
            defect = catalog.defect(category, anomaly_type)
            for number in range(per_type):
                normal = sample_image(category, index, size=size, seed=seed)
                save_png_atomic(normal, Path(root) / category / "train" / "good" / f"{index:03d}.png")
                request_seed = int(np.random.default_rng([seed, index, number]).integers(0, 2**31))
                prompt = writer.generate(PromptRequest(
                    category=category, anomaly_type=defect.name, subject=entry_category.subject,
                    knowledge=[catalog.entry(category, defect.name)], seed=request_seed,
                ))
                result = engine.generate(normal, GenerationRequest(
                    prompt=prompt, category=category, anomaly_type=defect.name,
                    is_texture=entry_category.kind == "texture", default_shape=defect.shape, region=defect.region,
                    seed=request_seed,
                ))
                if result.region is None or not result.region.any():
                    logger.warning("engine drew nothing for %s/%s #%d", category, anomaly_type, number)
                    continue
                written.append(save_png_atomic(result.image, mvtec_anomaly_path(root, category, defect.name, number)))
                save_png_atomic(result.region, mvtec_mask_path(root, category, defect.name, number))
                index += 1
    return written

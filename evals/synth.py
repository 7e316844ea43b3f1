"""Shared helpers for the IG/QE studies: a sample image for any catalog category, and one tool pass.

Why: `bench_qe`, `loop_study` and `contact_sheets` all need "a normal image that looks like this
category" and "PG -> IG (-> MG) for this (category, type)". The bundled sample images cover five MVTec
categories; every other category borrows the closest look: textures borrow a texture, objects on a
dark background (metal parts, cables, screws) the metal nut, the rest the capsule on a light background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tools.knowledge.catalog import load_catalog
from tools.samples import SAMPLE_CATEGORIES, sample_image
from tools.types import GenerationRequest, GenerationResult, KnowledgeEntry, PromptRequest

#: Object categories that look most like a bright part on a dark background (the metal nut sample).
DARK_BACKGROUND = {"metal_nut", "screw", "bottle", "cable", "transistor", "zipper", "hazelnut", "grid"}
TEXTURES = ("tile", "carpet", "wood")


def sample_category_for(category: str, index: int = 0) -> str:
    """The sample category whose images stand in for `category`."""
    if category in SAMPLE_CATEGORIES:
        return category
    cat = load_catalog().category(category)
    if cat.is_texture:
        return TEXTURES[(sum(map(ord, category)) + index) % len(TEXTURES)]
    return "metal_nut" if category in DARK_BACKGROUND else "capsule"


def normal_for(category: str, index: int = 0, size: int = 256, seed: int = 0) -> np.ndarray:
    """A normal image standing in for `category` (see `sample_category_for`)."""
    return sample_image(sample_category_for(category, index), index, size=size, seed=seed)


@dataclass
class Synthesis:
    """One PG -> IG pass."""

    category: str
    anomaly_type: str
    entry: KnowledgeEntry
    is_texture: bool
    prompt: str
    normal: np.ndarray
    result: GenerationResult


def synthesize(
    engine,
    prompt_gen,
    category: str,
    anomaly_type: str,
    normal: np.ndarray,
    seed: int,
    prompt: str | None = None,
    jpeg_quality: int | None = None,
) -> Synthesis:
    """Write an instruction for (category, type) with the template PG (unless given) and draw it
    (`jpeg_quality`: the normal image was stored as a JPEG of that quality)."""
    catalog = load_catalog()
    cat = catalog.category(category)
    entry = catalog.entry(category, anomaly_type)
    if prompt is None:
        prompt = prompt_gen.generate(
            PromptRequest(category=cat.name, anomaly_type=entry.anomaly_type, subject=cat.subject, knowledge=[entry], seed=seed)
        )
    result = engine.generate(
        normal,
        GenerationRequest(
            prompt=prompt,
            category=cat.name,
            anomaly_type=entry.anomaly_type,
            is_texture=cat.is_texture,
            default_shape=entry.shape,
            region=entry.region,
            seed=seed,
            jpeg_quality=jpeg_quality,
        ),
    )
    return Synthesis(cat.name, entry.anomaly_type, entry, cat.is_texture, prompt, normal, result)

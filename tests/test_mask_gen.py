"""MG's change mask: finds what changed, ignores noise, keeps thin defects, and agrees with the engine."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from tools.image_gen import ProceduralEngine
from tools.mask_gen import ChangeMaskGenerator, change_mask
from tools.samples import SAMPLE_CATEGORIES, sample_image
from tools.types import GenerationRequest, MaskGenerator, MaskResult
from tools.vocabulary import CONTRASTS, SHAPE_FAMILIES, SIZES


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    return sample_image("tile", 0, size=128)


def _disc(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_identical_images_give_an_empty_mask(base) -> None:
    res = change_mask(base, base.copy())
    assert not res.mask.any() and res.box is None and res.area_fraction == 0.0


def test_mismatched_shapes_are_refused_with_a_clear_message(base) -> None:
    with pytest.raises(ValueError, match="differ in size"):
        change_mask(base, base[:-1])
    with pytest.raises(ValueError, match="RGB"):
        change_mask(base[..., 0], base[..., 0])


def test_darkened_disc_is_recovered_with_its_box(base) -> None:
    truth = _disc(base.shape[:2], 60, 50, 15)
    edited = base.copy()
    edited[truth] = (edited[truth] * 0.6).astype(np.uint8)
    res = change_mask(base, edited)
    assert _iou(res.mask, truth) >= 0.95
    assert res.box == (45, 35, 76, 66)


def test_jpeg_level_noise_everywhere_is_ignored(base) -> None:
    rng = np.random.default_rng(0)
    truth = _disc(base.shape[:2], 70, 70, 12)
    edited = base.astype(np.float32) + rng.normal(0, 2.0, base.shape)
    edited[truth] -= 45
    edited = np.clip(edited, 0, 255).astype(np.uint8)
    res = change_mask(base, edited)
    assert _iou(res.mask, truth) >= 0.9
    assert res.info["floor"] >= 6.0


def test_thin_line_survives_the_morphology(base) -> None:
    truth = np.zeros(base.shape[:2], bool)
    truth[40, 20:100] = True  # a 1-px scratch
    edited = base.copy()
    edited[truth] = 20
    res = change_mask(base, edited)
    assert res.mask[40, 25:95].all()
    assert _iou(res.mask, truth) >= 0.6


def test_tiny_specks_are_dropped_but_a_real_blob_is_kept(base) -> None:
    edited = base.copy()
    edited[10, 10] = 0  # one hot pixel
    truth = _disc(base.shape[:2], 80, 80, 6)
    edited[truth] = 255
    res = change_mask(base, edited)
    assert not res.mask[8:13, 8:13].any()
    assert res.mask[80, 80]


def test_soft_edged_blob_is_cut_at_half_strength(base) -> None:
    yy, xx = np.mgrid[0:128, 0:128]
    r = np.hypot(xx - 64, yy - 64)
    alpha = np.clip((20 - r) / 6 + 0.5, 0, 1)  # coverage 0.5 at r = 20
    edited = np.clip(base - 60 * alpha[..., None], 0, 255).astype(np.uint8)
    res = change_mask(base, edited)
    assert _iou(res.mask, r <= 20) >= 0.9


def test_generator_class_matches_the_function_and_the_protocol(base) -> None:
    edited = base.copy()
    edited[30:50, 30:60] = 0
    gen: MaskGenerator = ChangeMaskGenerator()
    a, b = gen.generate(base, edited), change_mask(base, edited)
    assert isinstance(a, MaskResult) and np.array_equal(a.mask, b.mask) and a.box == b.box == (30, 30, 60, 50)


def test_mask_matches_engine_region_over_the_grid(capsys) -> None:
    """Every shape × size × contrast, cycling through the sample images (objects and textures)."""
    engine = ProceduralEngine()
    images = [(c, sample_image(c, i)) for c in SAMPLE_CATEGORIES for i in range(2)]
    per_family: dict[str, list[float]] = collections.defaultdict(list)
    empty = []
    k = 0
    for shape, family in SHAPE_FAMILIES.items():
        for size in SIZES:
            for contrast in CONTRASTS:
                category, img = images[k % len(images)]
                k += 1
                req = GenerationRequest(
                    prompt=f"Add one {size} {shape} with {contrast} contrast",
                    category=category,
                    anomaly_type=shape,
                    is_texture=SAMPLE_CATEGORIES[category] == "texture",
                    seed=k,
                )
                res = engine.generate(img, req)
                mask = change_mask(img, res.image).mask
                if not mask.any():
                    empty.append((shape, size, contrast, category))
                per_family[family].append(_iou(mask, res.region))
    scores = [v for vs in per_family.values() for v in vs]
    mean = float(np.mean(scores))
    with capsys.disabled():
        print(f"\nMG vs engine region: mean IoU {mean:.3f} over {len(scores)} renders")
        for family, vs in per_family.items():
            print(f"  {family:12s} {np.mean(vs):.3f} (min {np.min(vs):.3f}, n={len(vs)})")
    assert not empty, f"empty masks: {empty}"
    assert mean >= 0.85

"""The engine's appearance diversity and camera consistency: sampled looks, the input's own noise and
JPEG quality inside the defect, and MG's known-region contract."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tools.image_gen import ProceduralEngine
from tools.image_gen.appearance import CONTRAST_RANGE, SIZE_RANGE, WIDTH_RANGE, disturb_texture, sample_look
from tools.image_gen.camera import (
    blockiness_ratio,
    estimate_noise,
    jpeg_settings,
    residual_ratio,
)
from tools.mask_gen import ChangeMaskGenerator, change_mask
from tools.samples import SAMPLE_CATEGORIES, sample_image
from tools.types import GenerationRequest
from tools.vocabulary import parse_instruction

ENGINE = ProceduralEngine()


def _noisy(category: str, sigma: float = 4.0, seed: int = 0) -> np.ndarray:
    img = sample_image(category, 1).astype(np.float32)
    img += np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _gen(image, prompt, category, shape, seed, **kw):
    return ENGINE.generate(image, GenerationRequest(
        prompt=prompt, category=category, anomaly_type=shape, default_shape=shape,
        is_texture=SAMPLE_CATEGORIES[category] == "texture", seed=seed, **kw,
    ))


def test_a_word_narrows_its_range_and_no_word_leaves_the_broad_one() -> None:
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    tiny = sample_look(parse_instruction("Add one tiny scratch with low contrast"), rng(), is_texture=False)
    assert SIZE_RANGE["tiny"][0] <= tiny.extent_frac <= SIZE_RANGE["tiny"][1]
    assert CONTRAST_RANGE["low"][0] <= tiny.contrast <= CONTRAST_RANGE["low"][1]
    looks = [sample_look(parse_instruction("Add one scratch"), np.random.default_rng(s), is_texture=False) for s in range(400)]
    sizes = np.array([lk.extent_frac for lk in looks])
    contrasts = np.array([lk.contrast for lk in looks])
    assert sizes.min() < SIZE_RANGE["tiny"][1] and sizes.max() > SIZE_RANGE["large"][0]
    assert np.percentile(sizes, 95) / np.percentile(sizes, 5) >= 10  # two decades of area
    assert np.percentile(contrasts, 5) < 15 and contrasts.max() > CONTRAST_RANGE["high"][0]


def test_a_large_line_is_broad_as_well_as_long_and_a_tiny_one_thin() -> None:
    def widths(size: str) -> np.ndarray:
        spec = parse_instruction(f"Add one {size} scratch")
        return np.array([sample_look(spec, np.random.default_rng(s), is_texture=False).width_frac for s in range(200)])

    tiny, large = widths("tiny"), widths("large")
    assert np.median(large) > 2 * np.median(tiny)
    assert large.max() > 0.8 * WIDTH_RANGE[1] and tiny.min() < 1.5 * WIDTH_RANGE[0]


def test_the_line_renderer_draws_a_large_scratch_as_broad_as_its_look_asks() -> None:
    img = sample_image("capsule", 1)
    prompt = "Add one large light scratch with sharp edges, high contrast"
    ratios = []
    for seed in range(12):
        d = _gen(img, prompt, "capsule", "scratch", seed).info["defects"][0]
        ratios.append(d["width_px"] / d["length_px"])
    # Some are broad gouges, their width near a tenth of their length (not held to a hairline's share).
    assert max(ratios) >= 0.09


def test_a_tiny_flip_is_a_few_pixels_and_a_large_one_a_large_share_of_the_part() -> None:
    img = sample_image("metal_nut", 1)

    def areas(size: str) -> list[int]:
        prompt = f"Add one {size} gray flip with sharp edges"
        return [int(_gen(img, prompt, "metal_nut", "flip", s).region.sum()) for s in range(8)]

    tiny, large = areas("tiny"), areas("large")
    assert min(tiny) > 0 and np.median(tiny) <= 20
    assert max(large) >= 100 * np.median(tiny)


def test_for_one_seed_a_stronger_word_gives_a_stronger_defect_and_nothing_else_moves() -> None:
    img = sample_image("tile", 1)
    low = _gen(img, "Add one medium dark stain with low contrast", "tile", "stain", seed=5)
    high = _gen(img, "Add one medium dark stain with high contrast", "tile", "stain", seed=5)
    assert low.info["defects"][0]["centre"] == high.info["defects"][0]["centre"]
    change = lambda r: np.abs(r.image.astype(float) - img).max(-1)[r.region].mean()  # noqa: E731
    assert change(high) > 2 * change(low)


def test_interiors_are_textured_even_on_a_flat_surface() -> None:
    flat = np.full((192, 192, 3), 150, np.uint8)
    fg = np.ones((192, 192), bool)
    for seed in range(3):
        res = ENGINE.generate(flat, GenerationRequest(
            prompt="Add one large dark stain with sharp edges, high contrast", category="tile", anomaly_type="stain",
            is_texture=True, seed=seed), foreground=fg)
        from scipy import ndimage as ndi

        inner = ndi.binary_erosion(res.region, iterations=3)
        change = np.abs(res.image.astype(float) - flat).max(-1)[inner]
        assert inner.sum() > 50
        assert change.std() / change.mean() > 0.05, "a flat fill"


@pytest.mark.parametrize("shape", ["stain", "scratch", "hole", "texture", "bent", "contamination"])
def test_the_defect_carries_the_noise_of_a_noisy_input(shape) -> None:
    category = "metal_nut" if shape == "bent" else "tile"
    img = _noisy(category)
    ratios = []
    for seed in range(4):
        res = _gen(img, f"Add one large {shape} with medium contrast", category, shape, seed)
        r = residual_ratio(res.image, res.region)
        if r is not None:
            ratios.append(r)
    assert len(ratios) >= 3
    assert 0.8 <= float(np.median(ratios)) <= 1.25, ratios


def test_a_flat_pasted_patch_is_caught_by_the_noise_ratio() -> None:
    img = _noisy("tile")
    region = np.zeros(img.shape[:2], bool)
    region[60:110, 60:110] = True
    pasted = img.copy()
    pasted[region] = img[region].mean(axis=0).astype(np.uint8)
    assert residual_ratio(pasted, region) < 0.3
    assert 0.8 <= residual_ratio(img, region) <= 1.25


@pytest.mark.parametrize("quality,subsampling", [(60, 2), (90, 0)])
def test_jpeg_settings_are_read_from_the_quantization_tables(quality, subsampling) -> None:
    buf = io.BytesIO()
    Image.fromarray(sample_image("wood", 0)).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    settings = jpeg_settings(buf.getvalue())
    assert settings is not None and settings.quality == quality and settings.subsampling == subsampling
    png = io.BytesIO()
    Image.fromarray(sample_image("wood", 0)).save(png, format="PNG")
    assert jpeg_settings(png.getvalue()) is None


def test_a_jpeg_input_comes_out_through_the_same_quality_and_untouched_blocks_stay_identical() -> None:
    buf = io.BytesIO()
    Image.fromarray(_noisy("carpet")).save(buf, format="JPEG", quality=75)
    settings = jpeg_settings(buf.getvalue())
    img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    res = _gen(img, "Add one large dark stain with medium contrast", "carpet", "stain", seed=2,
               jpeg_quality=settings.quality, jpeg_subsampling=settings.subsampling)
    changed = (res.image != img).any(-1)
    # Only whole 16-px MCUs around the defect were re-encoded; every other block is bit-identical.
    blocks = changed.reshape(16, 16, 16, 16).any(axis=(1, 3))
    assert 0 < blocks.sum() < blocks.size // 2
    # The re-encoded blocks are a fixed point of the same quality, as a camera's own blocks are.
    again = np.asarray(Image.open(_jpeg_bytes(res.image, settings.quality)).convert("RGB")).astype(float)
    inside = np.repeat(np.repeat(blocks, 16, 0), 16, 1)
    assert np.abs(again - res.image)[inside].mean() < 0.3  # without the re-encoding: about 0.9
    block = blockiness_ratio(res.image, res.region)
    assert block is not None and 0.8 <= block <= 1.25


def _jpeg_bytes(image: np.ndarray, quality: int) -> io.BytesIO:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    out.seek(0)
    return out


def test_texture_disturbances_change_local_statistics_not_paint() -> None:
    carpet = sample_image("carpet", 0)[64:128, 64:128].astype(np.float32)
    weight = np.ones(carpet.shape[:2], np.float32)
    rng = np.random.default_rng(0)
    for op in ("warp", "contrast", "frequency"):
        out = disturb_texture(carpet, weight, op, 40.0, rng)
        # The mean colour stays (no paint); the pixels rearrange or the spread changes.
        assert abs(out.mean() - carpet.mean()) < 6.0
        assert np.abs(out - carpet).mean() > 3.0


def test_mg_uses_the_engines_region_for_a_faint_defect_and_falls_back_without_one() -> None:
    img = _noisy("tile")
    res = _gen(img, "Add one large dark stain with low contrast", "tile", "stain", seed=1)
    gen = ChangeMaskGenerator()
    known = gen.generate(img, res.image, known_region=res.region)
    assert known.info["source"] == "engine_region" and np.array_equal(known.mask, res.region)
    # A region where nothing changed is not trusted: the change mask decides.
    elsewhere = np.zeros_like(res.region)
    elsewhere[:20, :20] = True
    elsewhere &= ~res.region
    fallback = gen.generate(img, res.image, known_region=elsewhere)
    assert fallback.info["source"] == "change_mask"
    assert np.array_equal(fallback.mask, change_mask(img, res.image, sigma=gen.sigma).mask)


def test_noise_estimate_follows_the_added_noise() -> None:
    clean = sample_image("capsule", 0)
    assert estimate_noise(_noisy("capsule", 6.0)) > estimate_noise(_noisy("capsule", 2.0)) > estimate_noise(clean)


def test_a_jpeg_input_reaches_the_engine_through_a_run_and_mg_masks_the_engines_region(tmp_path) -> None:
    import json

    from anomaly_agent_cli import main

    path = tmp_path / "carpet.jpg"
    Image.fromarray(sample_image("carpet", 0)).save(path, quality=85)
    assert main(["synthesize", "--image", str(path), "--category", "carpet", "--anomaly-type", "hole",
                 "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "trajectory.json").read_text())
    assert [g["info"]["jpeg_quality"] for g in record["generations"].values()] == [85] * len(record["generations"])
    assert record["final"]["mask_iou"] == 1.0

"""The procedural engine: reproducible, on the product, and every word of the instruction moves the result."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from tools.foreground import estimate_foreground, foreground_box
from tools.image_gen import FALLBACKS, RENDERERS, ProceduralEngine
from tools.samples import SAMPLE_CATEGORIES, sample_image
from tools.types import GenerationRequest, GenerationResult
from tools.vocabulary import SHAPE_FAMILIES

ENGINE = ProceduralEngine()

#: One shape word of each engine family (line, blob, hole, deformation, texture).
SHAPES_EVERY_FAMILY = ["scratch", "crack", "thread", "stain", "contamination", "hole", "dent", "bent", "texture"]


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    """One normal image per sample category (objects on dark and on light backgrounds, textures)."""
    return {c: sample_image(c, 1) for c in SAMPLE_CATEGORIES}


def _gen(
    image: np.ndarray, prompt: str, category: str, seed: int = 0, shape: str = "stain"
) -> GenerationResult:
    req = GenerationRequest(
        prompt=prompt,
        category=category,
        anomaly_type=shape,
        is_texture=SAMPLE_CATEGORIES.get(category) == "texture",
        default_shape=shape,
        seed=seed,
    )
    return ENGINE.generate(image, req)


def _change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=-1)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_same_seed_gives_identical_output(images) -> None:
    a = _gen(images["wood"], "Add one medium dark scratch", "wood", seed=7)
    b = _gen(images["wood"], "Add one medium dark scratch", "wood", seed=7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.region, b.region)
    assert a.info == b.info


@pytest.mark.parametrize("shape", ["scratch", "stain", "hole"])
def test_different_seeds_give_different_placements(images, shape) -> None:
    centroids = {
        _centroid(_gen(images["tile"], f"Add one small {shape}", "tile", seed=s).region) for s in range(4)
    }
    assert len(centroids) == 4
    xs, ys = zip(*centroids, strict=True)
    assert np.ptp(xs) > 10 or np.ptp(ys) > 10


def test_input_image_is_not_modified(images) -> None:
    img = images["capsule"].copy()
    _gen(img, "Add one large red stain", "capsule")
    assert np.array_equal(img, images["capsule"])


@pytest.mark.parametrize("category", ["metal_nut", "capsule"], ids=["dark-background", "light-background"])
@pytest.mark.parametrize("shape", [*SHAPES_EVERY_FAMILY, "liquid", "missing"])
def test_defect_lies_on_the_object(images, category, shape) -> None:
    img = images[category]
    fg = estimate_foreground(img, is_texture=False)
    for seed in range(3):
        res = _gen(img, f"Add one large {shape} with high contrast", category, seed=seed)
        assert res.region.any(), f"{shape} drew nothing"
        inside = (res.region & fg).sum() / res.region.sum()
        assert inside >= 0.95, f"{shape} seed {seed}: only {inside:.0%} of the region on the object"


@pytest.mark.parametrize(
    "shape",
    [
        "scratch",
        "crack",
        "cut",
        "hair",
        "print",
        "stain",
        "discoloration",
        "oil",
        "glue",
        "rough",
        "hole",
        "pit",
        "dent",
        "texture",
    ],
)
def test_high_contrast_changes_more_than_low(images, shape) -> None:
    img = images["tile"]
    means = {}
    for contrast in ("low", "high"):
        vals = []
        for seed in range(3):
            res = _gen(img, f"Add one medium {shape} with {contrast} contrast", "tile", seed=seed)
            vals.append(_change(img, res.image)[res.region].mean())
        means[contrast] = float(np.mean(vals))
    assert means["high"] > 1.15 * means["low"], means
    assert means["low"] >= 10.0, f"low contrast must still be perceptible: {means}"


@pytest.mark.parametrize("shape", [*SHAPES_EVERY_FAMILY, "discoloration", "chip"])
def test_large_is_bigger_than_small(images, shape) -> None:
    for category in ("carpet", "metal_nut"):
        img = images[category]
        areas = {}
        for size in ("small", "large"):
            areas[size] = np.mean(
                [_gen(img, f"Add one {size} {shape}", category, seed=s).region.sum() for s in range(3)]
            )
        assert areas["large"] > 1.5 * areas["small"], (category, areas)


def test_size_words_are_ordered(images) -> None:
    img = images["wood"]
    areas = [
        np.mean([_gen(img, f"Add one {z} stain", "wood", seed=s).region.sum() for s in range(3)])
        for z in ("tiny", "small", "medium", "large")
    ]
    assert areas == sorted(areas) and areas[0] > 0


@pytest.mark.parametrize("shape", ["scratch", "stain", "hole", "contamination", "texture"])
@pytest.mark.parametrize("category", ["wood", "metal_nut", "capsule"])
def test_top_left_puts_the_defect_in_the_top_left_of_the_product(images, category, shape) -> None:
    img = images[category]
    fg = estimate_foreground(img, is_texture=SAMPLE_CATEGORIES[category] == "texture")
    x0, y0, x1, y1 = foreground_box(fg)
    for seed in range(3):
        res = _gen(img, f"Add one small {shape} in the top-left of the object", category, seed=seed)
        cx, cy = _centroid(res.region)
        assert cx < (x0 + x1) / 2 and cy < (y0 + y1) / 2, (seed, (cx, cy), (x0, y0, x1, y1))


def test_bottom_right_and_center_move_the_defect(images) -> None:
    img = images["tile"]
    h, w = img.shape[:2]
    br = [
        _centroid(_gen(img, "Add one small hole at the bottom-right", "tile", seed=s).region)
        for s in range(3)
    ]
    assert all(x > w / 2 and y > h / 2 for x, y in br)
    ce = [_centroid(_gen(img, "Add one small hole in the center", "tile", seed=s).region) for s in range(3)]
    assert all(abs(x - w / 2) < 0.25 * w and abs(y - h / 2) < 0.25 * h for x, y in ce)


@pytest.mark.parametrize("shape", ["stain", "contamination", "oil", "hole", "pit", "dent", "chip"])
@pytest.mark.parametrize("category", ["tile", "metal_nut"])
def test_two_gives_at_least_two_components(images, category, shape) -> None:
    res = _gen(images[category], f"Add two small {shape}s", category, seed=3, shape=shape)
    assert res.spec.count == 2
    assert len(res.info["defects"]) == 2
    _, n = ndi.label(res.region)
    assert n >= 2


@pytest.mark.parametrize("shape", list(SHAPE_FAMILIES))
def test_pixels_outside_the_region_are_nearly_unchanged(images, shape) -> None:
    for category in ("carpet", "capsule"):
        img = images[category]
        res = _gen(img, f"Add one medium {shape} with high contrast", category, seed=1)
        change = _change(img, res.image)
        outside = change[~res.region]
        # Soft tails, lips and faint shadows may spill a little; nothing strong happens outside.
        assert outside.mean() < 1.5, (category, outside.mean())
        assert (outside > 40).mean() < 0.01, (category, (outside > 40).mean())
        assert change[res.region].mean() > 5 * max(outside.mean(), 0.5)


@pytest.mark.parametrize("shape", list(SHAPE_FAMILIES))
def test_every_shape_renders_something(images, shape) -> None:
    for category in ("wood", "metal_nut"):
        res = _gen(images[category], f"Add one medium {shape}", category, seed=2)
        assert res.region is not None and res.region.any(), (shape, category, res.info)
        assert res.image.dtype == np.uint8 and res.image.shape == images[category].shape
        assert res.spec.shape == shape


def test_missing_on_a_texture_falls_back_to_a_hole_and_says_so(images) -> None:
    res = _gen(images["carpet"], "Add one medium missing piece", "carpet")
    assert "fallback" in res.info and "hole" in res.info["fallback"]
    assert res.region.any()


def test_every_family_has_a_renderer_or_a_fallback() -> None:
    for family in set(SHAPE_FAMILIES.values()):
        assert family in RENDERERS or FALLBACKS[family][0] in RENDERERS


def test_info_reports_sampled_parameters(images) -> None:
    res = _gen(
        images["tile"],
        "Add one large light scratch with soft edges, low contrast, in the top-left",
        "tile",
        seed=5,
    )
    info = res.info
    assert info["engine"] == "procedural" and info["seed"] == 5
    assert (info["shape"], info["size"], info["contrast"], info["softness"], info["colour"]) == (
        "scratch",
        "large",
        "low",
        "soft",
        "light",
    )
    d = info["defects"][0]
    for key in ("centre", "length_px", "width_px", "angle_deg", "edge_sigma_px", "area_px", "box"):
        assert key in d
    assert 0 < info["area_fraction"] < 0.2
    assert info["region_in_foreground"] >= 0.95
    json.dumps(info)  # goes into the agent's messages and trajectories


def test_light_and_dark_colour_words_set_the_direction(images) -> None:
    img = images["tile"]
    lum = lambda a: a.astype(np.float32) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    dark = _gen(img, "Add one medium dark stain", "tile", seed=4)
    light = _gen(img, "Add one medium light stain", "tile", seed=4)
    assert (lum(dark.image) - lum(img))[dark.region].mean() < -10
    assert (lum(light.image) - lum(img))[light.region].mean() > 10


def test_named_colour_tints_towards_that_colour(images) -> None:
    img = images["tile"]
    res = _gen(img, "Add one medium red stain with high contrast", "tile", seed=4)
    before = img[res.region].astype(np.float32).mean(axis=0)
    after = res.image[res.region].astype(np.float32).mean(axis=0)
    assert (after[0] - after[1]) > (before[0] - before[1]) + 30
    # Texture is kept: the tinted area still varies like the surface did.
    assert (
        res.image[res.region].astype(np.float32).std(axis=0).mean()
        > 0.3 * img[res.region].astype(np.float32).std(axis=0).mean()
    )


def test_soft_edges_are_wider_than_sharp(images) -> None:
    img = images["wood"]

    def transition(prompt: str) -> float:
        res = _gen(img, prompt, "wood", seed=6)
        ch = _change(img, res.image)
        partial = (ch > 3) & ~res.region
        return partial.sum() / max(res.region.sum(), 1)

    assert transition("Add one medium stain with soft edges") > transition(
        "Add one medium stain with sharp edges"
    )


def test_rejects_non_rgb_input() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        ENGINE.generate(
            np.zeros((32, 32), np.uint8),
            GenerationRequest(prompt="a scratch", category="wood", anomaly_type="scratch"),
        )


# ------------------------------------------------------------------ every catalog type, region steering


def _catalog_render(category: str, anomaly_type: str, seed: int, size: int = 160, feedback: str = ""):
    from evals.synth import normal_for, synthesize
    from tools.knowledge.catalog import load_catalog
    from tools.prompt_gen import TemplatePromptGenerator
    from tools.types import PromptRequest

    normal = normal_for(category, seed % 2, size=size, seed=1)
    prompt = None
    if feedback:
        catalog = load_catalog()
        entry = catalog.entry(category, anomaly_type)
        prompt = TemplatePromptGenerator().generate(
            PromptRequest(category=category, anomaly_type=anomaly_type, subject=catalog.category(category).subject,
                          knowledge=[entry], seed=seed, feedback=feedback)
        )
    return normal, synthesize(ENGINE, TemplatePromptGenerator(), category, anomaly_type, normal, seed=seed, prompt=prompt)


def test_every_mvtec_and_visa_type_renders_a_visible_defect_on_the_object() -> None:
    """All catalog pairs, asked for a medium-sized high-contrast defect (PG's instruction otherwise): a
    non-empty region on the product whose change stands out from the surface. (Without those words a
    type's distribution also holds barely visible specks, by design.)"""
    from tools.image_gen.blending import texture_contrast
    from tools.knowledge.catalog import load_catalog

    failures = []
    for k, (category, anomaly_type) in enumerate(load_catalog().pairs()):
        normal, syn = _catalog_render(category, anomaly_type, seed=k, feedback="Fixes: contrast=high; size=medium")
        region = syn.result.region
        fg = ENGINE.foreground(normal, syn.is_texture)
        change = _change(normal, syn.result.image)
        if region.sum() < 8:
            failures.append((category, anomaly_type, "empty region"))
            continue
        if (region & ndi.binary_dilation(fg, iterations=2)).sum() < 0.97 * region.sum():
            failures.append((category, anomaly_type, "off the object"))
        # Visible: the typical change is at least as strong as the surface's own spread around it
        # (deformations and transplants move the surface's own pixels, so half of that suffices).
        need = 0.4 if syn.entry.family in ("deformation", "texture", "missing") else 0.75
        contrast = texture_contrast(normal.astype(np.float32), region.astype(np.float32))
        if np.percentile(change[region], 75) < need * contrast:
            failures.append((category, anomaly_type, f"faint: {np.percentile(change[region], 75):.1f} < {need * contrast:.1f}"))
    assert not failures, failures


def test_every_knowledge_base_sub_region_has_a_placement_rule() -> None:
    from tools.image_gen.params import RULES, region_rule
    from tools.knowledge.catalog import load_catalog

    regions = {e.region for e in load_catalog().entries() if e.region}
    missing = sorted(r for r in regions if region_rule(r) not in RULES)
    assert not missing, f"add these to tools/image_gen/types.yaml regions: {missing}"


def test_sub_regions_steer_placement(images) -> None:
    """"end" puts a capsule defect at one of its ends, "rim" on the outline band, "middle" in the centre."""
    img = images["capsule"]
    fg = ENGINE.foreground(img, False)
    ys, xs = np.nonzero(fg)
    pts = np.stack([xs, ys], axis=1).astype(float)
    axis = np.linalg.svd(pts - pts.mean(0), full_matrices=False)[2][0]
    t = (pts - pts.mean(0)) @ axis
    depth = ndi.distance_transform_edt(np.pad(fg, 1))[1:-1, 1:-1]
    for seed in range(3):
        def at(region: str, shape: str = "stain") -> tuple[float, float]:
            req = GenerationRequest(prompt=f"Add one small dark {shape}", category="capsule", anomaly_type=shape,
                                    default_shape=shape, region=region, seed=seed)
            res = ENGINE.generate(img, req)
            assert res.info["region_rule"] is not None
            return _centroid(res.region)

        cx, cy = at("end")
        tc = (np.array([cx, cy]) - pts.mean(0)) @ axis
        assert abs(tc) > 0.45 * (t.max() - t.min()) / 2
        cx, cy = at("middle")
        assert abs((np.array([cx, cy]) - pts.mean(0)) @ axis) < 0.5 * (t.max() - t.min()) / 2
        rx, ry = at("rim", "chip")
        assert depth[int(round(ry)), int(round(rx))] <= 0.15 * np.sqrt(fg.sum())


def test_per_type_parameters_come_from_types_yaml() -> None:
    from tools.image_gen.params import type_params

    assert type_params("metal_nut", "color").extent > 1.2
    assert type_params("carpet", "color").extent == 1.0  # no entry: defaults


def test_bent_at_the_outline_turns_a_whole_flap_not_a_smudge(images) -> None:
    """A bent tab is a sizeable area that turned lighter or darker as a whole, with a crease, at the rim."""
    img = images["metal_nut"]
    res = _gen(img, "Add one large dark bent with sharp edges, high contrast, in the edge of the metal nut",
               "metal_nut", seed=3, shape="bent")
    assert res.info["defects"][0]["mode"] == "outline"
    region = res.region
    assert region.sum() > 150
    lum = lambda a: a.astype(np.float32) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    shift = (lum(res.image) - lum(img))[region]
    assert abs(np.median(shift)) > 20 and (np.sign(shift) == np.sign(np.median(shift))).mean() > 0.8


def test_fold_is_one_crease_between_a_lit_and_a_shaded_facet(images) -> None:
    img = images["capsule"]
    res = _gen(img, "Add one large dark fold with soft edges, high contrast, in the center", "capsule", seed=4, shape="fold")
    lum = lambda a: a.astype(np.float32) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    d = (lum(res.image) - lum(img))[res.region]
    # Both a brighter and a darker facet, each a real part of the defect (not one dark double line).
    assert (d > 8).mean() > 0.15 and (d < -8).mean() > 0.15


def test_a_named_colour_stain_keeps_the_surface_texture_under_it(images) -> None:
    img = images["tile"]
    res = _gen(img, "Add one large red stain with sharp edges, high contrast", "tile", seed=1)
    lum = lambda a: a.astype(np.float32) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    inner = ndi.binary_erosion(res.region, iterations=3)
    hp = lambda a: lum(a) - ndi.gaussian_filter(lum(a), 1.5)  # noqa: E731
    assert hp(res.image)[inner].std() > 0.6 * hp(img)[inner].std()


def test_info_holds_only_plain_python_values(images) -> None:
    """The info goes into checkpoints (msgpack) and JSON: no numpy scalars anywhere in it."""
    for shape in ("bent", "squeeze", "fold", "misplaced", "stain", "oil", "chip", "hole", "crack"):
        res = _gen(images["metal_nut"], f"Add one medium {shape} in the edge", "metal_nut", seed=1, shape=shape)

        def walk(v):
            if isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
            else:
                assert not isinstance(v, np.generic), (shape, v)

        walk(res.info)
        json.dumps(res.info)

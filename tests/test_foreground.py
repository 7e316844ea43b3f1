"""Foreground estimation and position areas: the product is found, and position words map onto it."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tools.foreground import centred_ellipse, estimate_foreground, foreground_box, foreground_diameter
from tools.image_gen.placement import region_mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _scene(
    bg: tuple[int, int, int], obj: tuple[int, int, int], noise: float = 3.0, seed: int = 0, size: int = 160
) -> tuple[np.ndarray, np.ndarray]:
    """An irregular (ellipse + notch) object on a uniform background, with sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    truth = ((yy - 85) / 50.0) ** 2 + ((xx - 75) / 38.0) ** 2 <= 1.0
    truth &= ~(((yy - 40) ** 2 + (xx - 75) ** 2) < 12**2)  # a notch at the top
    img = np.where(truth[..., None], np.array(obj, float), np.array(bg, float))
    # Some texture on the object so it is not a flat cut-out.
    img = img + truth[..., None] * 6.0 * np.sin(xx / 5.0)[..., None]
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), truth


@pytest.mark.parametrize(
    ("bg", "obj"),
    [((225, 225, 220), (60, 55, 50)), ((20, 20, 25), (200, 195, 185))],
    ids=["dark-object-on-light", "light-object-on-dark"],
)
def test_object_on_plain_background_is_found(bg, obj) -> None:
    img, truth = _scene(bg, obj)
    fg = estimate_foreground(img, is_texture=False)
    assert _iou(fg, truth) >= 0.9


def test_low_contrast_object_is_found() -> None:
    img, truth = _scene((120, 120, 120), (138, 132, 124), noise=2.0)
    fg = estimate_foreground(img, is_texture=False)
    assert _iou(fg, truth) >= 0.9


def test_uneven_lighting_is_not_taken_for_the_object() -> None:
    img, truth = _scene((40, 40, 40), (170, 160, 150))
    ramp = np.linspace(-25, 25, img.shape[1])[None, :, None]
    lit = np.clip(img.astype(float) + ramp * (~truth[..., None]), 0, 255).astype(np.uint8)
    fg = estimate_foreground(lit, is_texture=False)
    assert _iou(fg, truth) >= 0.9


def test_object_touching_the_border_does_not_swallow_the_background() -> None:
    rng = np.random.default_rng(1)
    img = np.full((128, 128, 3), 30.0) + rng.normal(0, 2, (128, 128, 3))
    truth = np.zeros((128, 128), bool)
    truth[20:100, 0:70] = True  # runs off the left edge
    img[truth] = 190
    fg = estimate_foreground(np.clip(img, 0, 255).astype(np.uint8), is_texture=False)
    assert _iou(fg, truth) >= 0.9


def test_texture_is_whole_frame_minus_thin_border() -> None:
    img = np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    fg = estimate_foreground(img, is_texture=True)
    assert 0.9 < fg.mean() < 1.0
    assert fg[50, 60] and not fg[0, 0] and not fg[-1, -1]


def test_featureless_image_falls_back_to_centred_ellipse_with_warning(caplog) -> None:
    img = np.full((80, 100, 3), 128, np.uint8)
    with caplog.at_level(logging.WARNING, logger="tools.foreground"):
        fg = estimate_foreground(img, is_texture=False)
    assert np.array_equal(fg, centred_ellipse((80, 100)))
    assert any("centred ellipse" in r.getMessage() for r in caplog.records)


def test_rejects_non_rgb_uint8() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        estimate_foreground(np.zeros((10, 10), np.uint8), is_texture=False)
    with pytest.raises(ValueError, match="uint8 RGB"):
        estimate_foreground(np.zeros((10, 10, 3), np.float32), is_texture=False)


def test_box_and_diameter_of_a_disc() -> None:
    yy, xx = np.mgrid[0:100, 0:100]
    disc = (yy - 50) ** 2 + (xx - 40) ** 2 <= 20**2
    assert foreground_box(disc) == (20, 30, 61, 71)
    assert abs(foreground_diameter(disc) - 40) < 1.0


@pytest.mark.parametrize(
    ("position", "x_side", "y_side"),
    [
        ("top-left", "low", "low"),
        ("top-right", "high", "low"),
        ("bottom-left", "low", "high"),
        ("bottom-right", "high", "high"),
    ],
)
def test_quadrant_positions_lie_in_that_quadrant_of_the_product(position, x_side, y_side) -> None:
    fg = np.zeros((120, 160), bool)
    fg[20:100, 40:140] = True  # box x 40..140, y 20..100: centre (90, 60)
    area = region_mask(fg, position)
    ys, xs = np.nonzero(area)
    assert area.any() and (area <= fg).all()
    assert (xs < 90).all() if x_side == "low" else (xs >= 90).all()
    assert (ys < 60).all() if y_side == "low" else (ys >= 60).all()


def test_edge_is_a_band_along_the_outline_and_center_is_inside() -> None:
    fg = np.zeros((120, 120), bool)
    fg[10:110, 10:110] = True
    edge = region_mask(fg, "edge", np.random.default_rng(0))
    center = region_mask(fg, "center")
    assert edge[10, 60] and edge[60, 10] and not edge[60, 60]
    assert center[60, 60] and not center[12, 12]
    assert edge.sum() < 0.5 * fg.sum()


def test_anywhere_and_unknown_positions_give_the_whole_foreground() -> None:
    fg = np.zeros((50, 50), bool)
    fg[5:45, 5:45] = True
    assert np.array_equal(region_mask(fg, "anywhere"), fg)
    assert np.array_equal(region_mask(fg, "somewhere odd"), fg)

"""Sample normal images: written where expected, readable, MVTec-named, reproducible and varied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.samples import SAMPLE_CATEGORIES, make_samples, sample_image

MVTEC = {
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
}  # fmt: skip


def test_make_samples_writes_readable_rgb_pngs_in_category_folders(tmp_path: Path) -> None:
    records = make_samples(tmp_path, size=96, per_category=3)
    assert len(records) == 3 * len(SAMPLE_CATEGORIES)
    for rec in records:
        path = Path(rec["path"])
        assert path.parent == tmp_path / rec["category"] and path.suffix == ".png"
        assert rec["kind"] == SAMPLE_CATEGORIES[rec["category"]]
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (96, 96)
            assert im.format == "PNG"


def test_categories_are_mvtec_names_with_textures_and_objects() -> None:
    assert set(SAMPLE_CATEGORIES) <= MVTEC
    kinds = list(SAMPLE_CATEGORIES.values())
    assert kinds.count("texture") >= 2 and kinds.count("object") >= 2


def test_samples_are_reproducible(tmp_path: Path) -> None:
    a = make_samples(tmp_path / "a", size=64, per_category=2)
    b = make_samples(tmp_path / "b", size=64, per_category=2)
    for ra, rb in zip(a, b, strict=True):
        assert Path(ra["path"]).read_bytes() == Path(rb["path"]).read_bytes()


@pytest.mark.parametrize("category", list(SAMPLE_CATEGORIES))
def test_variants_within_a_category_differ(category: str) -> None:
    imgs = [sample_image(category, i, size=96).astype(np.int16) for i in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(imgs[i] - imgs[j]).mean() > 3


@pytest.mark.parametrize("category", [c for c, k in SAMPLE_CATEGORIES.items() if k == "object"])
def test_object_samples_have_a_plain_border(category: str) -> None:
    img = sample_image(category, 0, size=128).astype(np.float32)
    border = np.concatenate(
        [
            img[:4].reshape(-1, 3),
            img[-4:].reshape(-1, 3),
            img[:, :4].reshape(-1, 3),
            img[:, -4:].reshape(-1, 3),
        ]
    )
    centre = img[48:80, 48:80].reshape(-1, 3)
    assert border.std(axis=0).max() < 12  # a plain background...
    assert np.abs(centre.mean(axis=0) - border.mean(axis=0)).max() > 30  # ...that the object stands out from


def test_unknown_category_and_tiny_size_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown sample category"):
        sample_image("bagel", 0)
    with pytest.raises(ValueError, match="at least 32"):
        sample_image("tile", 0, size=8)

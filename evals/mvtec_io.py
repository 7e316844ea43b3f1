"""Read and write datasets in the MVTec-AD layout (MVTec-AD, VisA converted to it, our batch output).

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/<type>/*.png                 (type 'good': normal test images)
    ROOT/<category>/ground_truth/<type>/<stem>_mask.png

Why one reader for all three: the protocols must not care whether anomalies are real or generated.
Masks are matched by stem (`000.png` -> `000_mask.png`, VisA conversions sometimes drop `_mask`);
an anomaly without a mask is an error, because localisation metrics would silently count it as normal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evals.errors import DatasetLayoutError
from tools.dataset_layout import IMAGE_SUFFIXES, mvtec_anomaly_path, mvtec_mask_path
from tools.imaging import save_png_atomic

GOOD = "good"


@dataclass
class Item:
    """One image of the dataset; `mask` is None for normal images."""

    image: Path
    mask: Path | None = None


@dataclass
class Category:
    """One category: normal training images and test images per type ('good' included)."""

    name: str
    train: list[Item] = field(default_factory=list)
    test: dict[str, list[Item]] = field(default_factory=dict)

    @property
    def defect_types(self) -> list[str]:
        return sorted(t for t in self.test if t != GOOD)


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _mask_for(root: Path, category: str, anomaly_type: str, image: Path) -> Path:
    folder = root / category / "ground_truth" / anomaly_type
    for name in (f"{image.stem}_mask", image.stem):
        for suffix in (".png", image.suffix):
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    raise DatasetLayoutError(f"no mask for {image} (looked for {folder}/{image.stem}_mask.png)")


def read_category(root: Path, name: str) -> Category:
    """One category of an MVTec-layout dataset; anomalies come with their mask paths."""
    root = Path(root)
    base = root / name
    if not (base / "test").is_dir() and not (base / "train").is_dir():
        raise DatasetLayoutError(f"{base} has neither train/ nor test/: not an MVTec-layout category")
    category = Category(name, train=[Item(p) for p in _images(base / "train" / GOOD)])
    for folder in sorted(p for p in (base / "test").glob("*") if p.is_dir()):
        items = [
            Item(p, None if folder.name == GOOD else _mask_for(root, name, folder.name, p))
            for p in _images(folder)
        ]
        if items:
            category.test[folder.name] = items
    return category


def read_dataset(root: Path, categories: list[str] | None = None) -> dict[str, Category]:
    """Every category (or the named ones) under `root`, by name.

    Raises:
        DatasetLayoutError: `root` is missing, holds no category, or a named category is absent.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder not found: {root}")
    names = categories or sorted(
        p.name for p in root.iterdir() if p.is_dir() and ((p / "test").is_dir() or (p / "train").is_dir())
    )
    if not names:
        raise DatasetLayoutError(
            f"{root} holds no <category>/train or <category>/test folder (MVTec-AD layout)"
        )
    return {name: read_category(root, name) for name in names}


def write_anomaly(
    root: Path, category: str, anomaly_type: str, number: int, image: np.ndarray, mask: np.ndarray
) -> Item:
    """Write one anomaly and its mask where our batch writes them (atomically)."""
    img = save_png_atomic(image, mvtec_anomaly_path(root, category, anomaly_type, number))
    msk = save_png_atomic(np.asarray(mask, bool), mvtec_mask_path(root, category, anomaly_type, number))
    return Item(img, msk)


def write_normal(root: Path, category: str, split: str, number: int, image: np.ndarray) -> Item:
    """Write one normal image to `train/good` (split 'train') or `test/good` (split 'test')."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return Item(save_png_atomic(image, Path(root) / category / split / GOOD / f"{number:03d}.png"))

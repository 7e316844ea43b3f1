"""Paths of the MVTec-AD folder layout, the format every anomaly detector reads.

    ROOT/<category>/train/good/NNN.png
    ROOT/<category>/test/<type>/NNN.png           (type 'good' for normal test images)
    ROOT/<category>/ground_truth/<type>/NNN_mask.png
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def _stem(number: int | str) -> str:
    """A number as its 3-digit stem (`7` -> `007`); a string is taken as the stem itself."""
    return number if isinstance(number, str) else f"{number:03d}"


def mvtec_anomaly_path(root: Path, category: str, anomaly_type: str, number: int | str) -> Path:
    return Path(root) / category / "test" / anomaly_type / f"{_stem(number)}.png"


def mvtec_mask_path(root: Path, category: str, anomaly_type: str, number: int | str) -> Path:
    return Path(root) / category / "ground_truth" / anomaly_type / f"{_stem(number)}_mask.png"

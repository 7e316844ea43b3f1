"""The settings of `anomaly-agent eval transfer`, fixed before any generator is compared.

Why a frozen config with defaults: a transfer table means something only when the detector, its
training budget (steps, never time), its augmentation and the splits are the same for every row; they
are chosen once, here, and never per generator. Nothing in this module imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: The rows of the table, in order: the agent first (its row is the headline).
ROWS: tuple[str, ...] = ("agent", "open_loop", "draem", "cutpaste_scar", "defect_synthesis")
#: Rows drawn by our own engine: never tested on each other's output, and given the leave-one-family-out split.
ENGINE_ROWS: frozenset[str] = frozenset({"agent", "open_loop"})
#: The row every engine row is compared with, paired over detector seeds.
OPEN_LOOP = "open_loop"


@dataclass(frozen=True)
class DetectorConfig:
    """A small fully convolutional detector (the evaluation UNet at small width) and its training budget.

    Every step draws half its batch from normal images and half from anomalies, takes a random
    `crop` x `crop` window of each, applies the same random flip/90-degree rotation to image and mask,
    and re-encodes each crop as JPEG with probability `jpeg_prob` (quality uniform in `jpeg_quality`),
    so compression is no cue in training either. The image score is the maximum of the `pool` x `pool`
    average-pooled map of the whole image.
    """

    unet_base: int = 8
    unet_depth: int = 3
    steps: int = 200
    batch: int = 16
    crop: int = 64
    lr: float = 2e-3
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (70, 95)
    pool: int = 9


@dataclass(frozen=True)
class SplitConfig:
    """Which images the detectors train and test on.

    Normals `0..train_normals-1` of each category are the training normals (generators draw their
    training anomalies on them); the next `test_normals` are held out: the test's normal images, and the
    images the test anomalies are drawn on. Each test source keeps at most `test_anomalies` anomalies per
    category, spread evenly over its types. Every test image is stored as PNG and as JPEG at each of
    `jpeg_qualities`, and all copies are scored.
    """

    categories: tuple[str, ...] = ("carpet", "tile", "metal_nut", "capsule")
    types: dict[str, tuple[str, ...]] | None = None
    size: int = 128
    train_normals: int = 10
    test_normals: int = 8
    test_anomalies: int = 16
    jpeg_qualities: tuple[int, ...] = (75, 90)


@dataclass
class TransferConfig:
    """One run of the benchmark: where it writes, which rows, how many detector seeds."""

    out: Path
    generators: tuple[str, ...] = ROWS
    #: Five, not three: one seed's detector moves a row by up to 0.05, so three leave the paired gain's error as
    #: large as the gains worth finding.
    detector_seeds: int = 5
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    progress: bool = False

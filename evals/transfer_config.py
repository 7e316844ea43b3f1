"""The settings of `anomaly-agent eval transfer`, fixed before any generator is compared.

Why a frozen config with defaults: a transfer table means something only when the detector, its
training budget (steps, never time), its augmentation and the splits are the same for every row; they
are chosen once, here, and never per generator. Nothing in this module imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

#: The rows of the table, in order: the agent first (its row is the headline).
ROWS: tuple[str, ...] = ("agent", "open_loop", "draem", "cutpaste_scar", "defect_synthesis")
#: Rows drawn by our own engine: never tested on each other's output, and given the leave-one-family-out split.
ENGINE_ROWS: frozenset[str] = frozenset({"agent", "open_loop"})
#: The row every engine row is compared with, paired over detector seeds.
OPEN_LOOP = "open_loop"


@dataclass(frozen=True)
class DetectorConfig:
    """A small fully convolutional detector and its training budget.

    The detector is a head trained on frozen ImageNet features (EfficientNet-Lite0, which ships in a
    registry package), or the evaluation UNet trained from scratch (`backbone` ""). Every step draws half
    its batch from normal images and half from anomalies, takes a random `crop` x `crop` window of each
    (an anomaly's window holds part of its defect), applies the same random flip/90-degree rotation to image and mask,
    and re-encodes each crop as JPEG with probability `jpeg_prob` (quality uniform in `jpeg_quality`),
    so compression is no cue in training either. The image score is the maximum of the `pool` x `pool`
    average-pooled map of the whole image.
    """

    #: "efficientnet-lite0": a head of `head_width` channels on frozen ImageNet features; "": the UNet below,
    #: trained from scratch.
    backbone: str = "efficientnet-lite0"
    head_width: int = 32
    unet_base: int = 8
    unet_depth: int = 3
    steps: int = 200
    batch: int = 16
    crop: int = 64
    #: An anomaly's crop always holds part of its defect, so every anomaly in a batch is one for every row
    #: (with uniform crops most windows of a small defect's image hold no defect at all).
    crop_on_defect: bool = True
    lr: float = 2e-3
    #: Decay of the exponential moving average of the weights that the detector keeps.
    ema: float = 0.97
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (70, 95)
    pool: int = 9


@dataclass(frozen=True)
class SplitConfig:
    """Which images the detectors train and test on.

    Each category has `train_normals` training normals and `test_normals` held-out ones (different
    images). Generators draw their training anomalies on the first `train_bases` training normals and the
    test anomalies on the first `test_bases` held-out normals; the detectors see every training normal, and
    every held-out normal is a negative of the test. Each test source keeps at most `test_anomalies`
    anomalies per category, spread evenly over its types. Every test image is stored as PNG and as JPEG at
    each of `jpeg_qualities`, and all copies are scored.

    Why more normals than bases: normals cost nothing to make and anomalies cost a generator run each. A
    detector that has seen few normals fires on the ordinary variation of an unseen one, and a test with
    few negatives turns one such image into a tenth of a category's AUROC; both move a row with the
    detector's seed far more than the generators differ.
    """

    categories: tuple[str, ...] = ("carpet", "tile", "metal_nut", "capsule")
    types: dict[str, tuple[str, ...]] | None = None
    size: int = 128
    train_normals: int = 40
    train_bases: int = 10
    test_normals: int = 24
    test_bases: int = 8
    test_anomalies: int = 16
    jpeg_qualities: tuple[int, ...] = (75, 90)

    def bases(self) -> tuple[int, int]:
        """(training, held-out) normals per category that generators draw on: never more than there are."""
        return min(self.train_bases, self.train_normals), min(self.test_bases, self.test_normals)


@dataclass
class TransferConfig:
    """One run of the benchmark: where it writes, which rows, how many data draws and detector seeds."""

    out: Path
    generators: tuple[str, ...] = ROWS
    #: Detectors per data draw and row, each with its own seed.
    detector_seeds: int = 2
    #: Data draws: the whole data set (normals, every generator's output, the test sets) drawn anew with
    #: data seeds `seed`, `seed + 1`, ... Five: the loop's gain moves more from one draw of the data to the
    #: next than from one detector seed to the next, so its standard error is taken over draws, and
    #: a draw costs about as much as ten detectors.
    data_draws: int = 5
    #: The first data seed.
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    progress: bool = False

    def draw(self, index: int) -> TransferConfig:
        """The config of data draw `index`: its own data seed and its own folder `out/draw_<seed>`."""
        seed = self.seed + index
        return replace(self, seed=seed, out=self.out / f"draw_{seed}", data_draws=1)

"""IS and IC-LPIPS, the literature's diversity/fidelity numbers, and their offline stand-ins.

Why stand-ins: IS needs Inception-v3 and LPIPS needs VGG16 plus LPIPS's learned linear weights; none of
them ships in a registry package (DESIGN §7-8). Offline we compute the same statistics on the
EfficientNet-Lite0 ImageNet classifier that does ship: its 1000-class softmax for IS, and its
unit-normalised multi-layer features for LPIPS (squared difference, spatial mean, summed over layers,
*without* learned per-channel weights). Every number carries the backbone's name in its label
(`STANDIN_IS`, `STANDIN_LPIPS`), and must never be compared with published IS/LPIPS values.

The protocols (DESIGN §7):
* IS per (category, type) folder: exp(E_x KL(p(y|x) || p(y))).
* IC-LPIPS: the first floor(n/3) real anomalies are cluster centres; each generated image joins its
  nearest centre; at most 50 per cluster; the score is the mean over clusters of the mean pairwise
  distance inside the cluster. Clusters with fewer than two members have no pairs and are reported as
  empty, not averaged in.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

from evals.errors import WeightsNotSupported

logger = logging.getLogger(__name__)

STANDIN_IS = "IS (EfficientNet-Lite0 stand-in, not Inception)"
STANDIN_LPIPS = "IC-LPIPS (EfficientNet-Lite0 unweighted stand-in, not LPIPS-VGG)"
#: Input side of the ImageNet classifier.
CLASSIFIER_SIDE = 224
MAX_PER_CLUSTER = 50


def check_reference_weights(inception: str | Path | None, lpips_vgg: str | Path | None) -> None:
    """Refuse local Inception / LPIPS-VGG weights with a clear message instead of silently ignoring them.

    Why refuse: the two networks need torchvision's model definitions (not installable beside the CPU
    torch here); a hand port that is not checked against the reference implementation would produce
    numbers that look published-comparable but are not.
    """
    for name, path in (("Inception", inception), ("LPIPS-VGG", lpips_vgg)):
        if path:
            raise WeightsNotSupported(
                f"loading {name} weights from {path} is not supported yet (no torchvision here); "
                "leave the option out to get the EfficientNet-Lite0 stand-ins, labelled as such"
            )


def _resize_batch(images: list[np.ndarray], side: int) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2)
    if x.shape[-1] != side or x.shape[-2] != side:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return (x - 127.0) / 128.0


def class_probabilities(images: list[np.ndarray], batch: int = 16) -> np.ndarray:
    """ImageNet class probabilities (N, 1000) of uint8 RGB images from EfficientNet-Lite0 at 224 px."""
    import torch

    from tools.features import load_backbone

    model = load_backbone()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            out.append(
                torch.softmax(model(_resize_batch(images[i : i + batch], CLASSIFIER_SIDE)), dim=1).numpy()
            )
    return np.concatenate(out) if out else np.zeros((0, 1000), np.float32)


def inception_score(probs: np.ndarray) -> float:
    """exp(mean KL(p(y|x) || p(y))) over the rows of `probs` (one split: folders are small).

    1.0 when every image gets the same prediction; the number of classes when the predictions are
    confident (one-hot) and spread evenly over the classes.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"need a non-empty (N, classes) array, got shape {p.shape}")
    marginal = p.mean(axis=0, keepdims=True)
    eps = 1e-12
    kl = (p * (np.log(p + eps) - np.log(marginal + eps))).sum(axis=1)
    return float(np.exp(kl.mean()))


@dataclass
class LpipsFeatures:
    """Unit-normalised feature maps of a set of images, one list of (C, h, w) arrays per image."""

    maps: list[list[np.ndarray]]


def lpips_features(images: list[np.ndarray], batch: int = 16) -> LpipsFeatures:
    """EfficientNet-Lite0 features at strides 4, 8 and 16 (`tools.features.LEVELS`), unit length per position."""
    from tools.features import feature_maps

    maps: list[list[np.ndarray]] = []
    for i in range(0, len(images), batch):
        maps += feature_maps(images[i : i + batch])
    return LpipsFeatures(maps)


def lpips_distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """LPIPS-style distance without learned weights: per layer, the spatial mean of the squared
    difference of unit-normalised features summed over channels; summed over layers."""
    return float(sum(((fa - fb) ** 2).sum(axis=0).mean() for fa, fb in zip(a, b, strict=True)))


@dataclass
class ClusterResult:
    """IC-LPIPS of one folder: the score and how the clusters filled."""

    score: float
    clusters: int
    empty: int
    sizes: list[int]


def ic_lpips(real: LpipsFeatures, generated: LpipsFeatures) -> ClusterResult:
    """IC-LPIPS with the first floor(n/3) real anomalies as centres (DESIGN §7).

    Args:
        real: Features of the real (here possibly: another generator's held-out) anomalies, in order.
        generated: Features of the generated anomalies of the same (category, type).

    Returns:
        The mean over non-empty clusters (two or more members) of the mean pairwise distance; NaN when
        every cluster is empty. `empty` counts clusters with fewer than two members.
    """
    centres = real.maps[: max(1, len(real.maps) // 3)] if real.maps else []
    if not centres or not generated.maps:
        return ClusterResult(float("nan"), len(centres), len(centres), [0] * len(centres))
    members: list[list[int]] = [[] for _ in centres]
    for j, g in enumerate(generated.maps):
        nearest = int(np.argmin([lpips_distance(g, c) for c in centres]))
        if len(members[nearest]) < MAX_PER_CLUSTER:
            members[nearest].append(j)
    means = []
    for idx in members:
        pairs = [
            lpips_distance(generated.maps[i], generated.maps[k]) for i, k in itertools.combinations(idx, 2)
        ]
        if pairs:
            means.append(float(np.mean(pairs)))
    empty = sum(len(m) < 2 for m in members)
    if empty:
        logger.info("IC-LPIPS: %d of %d clusters have fewer than two members", empty, len(centres))
    return ClusterResult(
        float(np.mean(means)) if means else float("nan"), len(centres), empty, [len(m) for m in members]
    )

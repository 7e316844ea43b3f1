"""The downstream protocols (DESIGN §7): defect-type classification (ResNet34) and localisation (UNet).

Why these rules:
* Both detectors train only on generated data; the epoch is chosen on *held-out generated* data (a
  stratified slice of the training generator's own output), never on the test set, so the test numbers
  are not tuned on the test set (a known flaw of published protocols).
* Classification tests on the last 2/3 of each type's real anomalies (the first 1/3 serve as IC-LPIPS
  centres elsewhere, so they are not reused as test data).
* Localisation tests on every normal test image plus those anomalies; the image score is the maximum of
  the 21x21 average-pooled anomaly map; image and pixel AUROC, AP and F1-max.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evals.detectors import UNet, resnet34
from evals.metrics import detection_metrics

logger = logging.getLogger(__name__)

POOL = 21


@dataclass
class TrainConfig:
    """Sizes and schedule of the two detectors (small defaults: they train on a CPU in about a minute)."""

    cls_epochs: int = 6
    loc_epochs: int = 8
    batch: int = 8
    cls_lr: float = 1e-3
    loc_lr: float = 2e-3
    unet_base: int = 16
    unet_depth: int = 4
    holdout: float = 0.2
    resnet_weights: str | None = None
    seed: int = 0


@dataclass
class Fitted:
    """A trained detector and how its epoch was chosen."""

    model: torch.nn.Module
    best_epoch: int
    val_history: list[float] = field(default_factory=list)


def holdout_split(
    labels: list[int], fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Indices (train, held-out), stratified by label, at least one held out per label with 2+ items."""
    train, held = [], []
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(idx)
        k = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        held += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(held)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB (H, W, 3) images -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _flips(
    x: torch.Tensor, y: torch.Tensor | None, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same random horizontal/vertical flip for a batch of images (and their masks)."""
    for dim in (2, 3):
        if rng.random() < 0.5:
            x = x.flip(dim)
            y = y.flip(dim) if y is not None and y.dim() == 4 else y
    return x, y


def _fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn,
    score_fn,
    epochs: int,
    lr: float,
    batch: int,
    rng: np.random.Generator,
) -> Fitted:
    """Adam over shuffled mini-batches; after each epoch `score_fn(model)` on held-out data; keep the best epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, history = -np.inf, copy.deepcopy(model.state_dict()), []
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(x))
        for i in range(0, len(order), batch):
            idx = torch.from_numpy(order[i : i + batch])
            if len(idx) < 2:  # batch norm needs two samples
                continue
            xb, yb = _flips(x[idx], y[idx], rng)
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        recalibrate_batch_norm(model, x, batch)
        score = float(score_fn(model))
        history.append(score)
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return Fitted(model, int(np.argmax(history)) + 1 if history else 0, history)


@torch.no_grad()
def recalibrate_batch_norm(model: torch.nn.Module, x: torch.Tensor, batch: int) -> None:
    """Recompute every batch-norm layer's running statistics as the exact mean over `x`, then eval mode.

    Why: with a few dozen training steps the exponential running averages (momentum 0.1) still lag the
    weights, and an eval-mode network trained from scratch then answers one class for every input
    (measured here: ResNet34 on 30 images at chance for 15 epochs). Exact statistics ("precise BN") fix
    that without touching the weights.
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for i in range(0, len(x), batch):
        if len(x[i : i + batch]) >= 2:
            model(x[i : i + batch])
    for m, momentum in zip(layers, saved, strict=True):
        m.momentum = momentum
    model.eval()


@torch.inference_mode()
def _predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else torch.zeros(0)


def train_classifier(images: list[np.ndarray], labels: list[int], classes: int, cfg: TrainConfig) -> Fitted:
    """ResNet34 on generated anomalies (classes = defect types); epoch by held-out accuracy."""
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    tr, va = holdout_split(labels, cfg.holdout, rng)
    x, y = to_tensor(images), torch.tensor(labels)
    model = resnet34(classes, cfg.resnet_weights)

    def accuracy(m: torch.nn.Module) -> float:
        return float((_predict(m, x[va]).argmax(1) == y[va]).float().mean()) if va else 0.0

    return _fit(model, x[tr], y[tr], F.cross_entropy, accuracy, cfg.cls_epochs, cfg.cls_lr, cfg.batch, rng)


def classify(model: torch.nn.Module, images: list[np.ndarray]) -> np.ndarray:
    """Predicted class index per image."""
    return _predict(model, to_tensor(images)).argmax(1).numpy() if images else np.zeros(0, int)


def _seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice: defects cover a few percent of the pixels, and BCE alone learns 'all normal'."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    dice = 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice


def train_localizer(images: list[np.ndarray], masks: list[np.ndarray], cfg: TrainConfig) -> Fitted:
    """UNet on generated image/mask pairs plus normals (empty masks); epoch by held-out pixel AP.

    The held-out slice is stratified by anomalous/normal, so it has both kinds of pixels.
    """
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    kinds = [int(m.any()) for m in masks]
    tr, va = holdout_split(kinds, cfg.holdout, rng)
    x = to_tensor(images)
    y = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    model = UNet(cfg.unet_base, cfg.unet_depth)

    def pixel_ap(m: torch.nn.Module) -> float:
        maps = torch.sigmoid(_predict(m, x[va])).numpy()
        return detection_metrics(maps, y[va].numpy() > 0.5, "pixel_")["pixel_ap"]

    return _fit(model, x[tr], y[tr], _seg_loss, pixel_ap, cfg.loc_epochs, cfg.loc_lr, cfg.batch, rng)


def anomaly_maps(model: torch.nn.Module, images: list[np.ndarray]) -> np.ndarray:
    """Per-pixel anomaly probabilities (N, H, W)."""
    return torch.sigmoid(_predict(model, to_tensor(images)))[:, 0].numpy()


def image_scores(maps: np.ndarray, pool: int = POOL) -> np.ndarray:
    """Image score: the maximum of the `pool` x `pool` average-pooled anomaly map (stride 1, same size)."""
    t = torch.from_numpy(np.asarray(maps, np.float32))[:, None]
    pooled = F.avg_pool2d(t, pool, stride=1, padding=pool // 2, count_include_pad=False)
    return pooled.amax(dim=(1, 2, 3)).numpy()


def localization_metrics(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Image and pixel AUROC, AP, F1-max; an image is anomalous when its ground-truth mask is non-empty."""
    masks = np.asarray(masks, bool)
    labels = masks.reshape(len(masks), -1).any(axis=1)
    return {
        **detection_metrics(image_scores(maps), labels, "image_"),
        **detection_metrics(maps, masks, "pixel_"),
    }


def last_two_thirds(items: list) -> list:
    """The test part of a type's real anomalies: all but the first floor(n/3) (which are IC-LPIPS centres)."""
    return items[len(items) // 3 :]


def load_resized(path: str | Path, size: int, mask: bool = False) -> np.ndarray:
    """An image (uint8 RGB) or mask (bool) resized to size x size (real datasets are 700-1024 px)."""
    from PIL import Image

    from tools.imaging import load_image, load_mask

    if mask:
        m = load_mask(path)
        if m.shape != (size, size):
            m = (
                np.asarray(
                    Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
                )
                > 127
            )
        return m
    im = load_image(path)
    if im.shape[:2] != (size, size):
        im = np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
    return im

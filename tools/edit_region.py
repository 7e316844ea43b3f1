"""Where a model-based IG backend may edit, and how its output goes back into the full image.

Why: a diffusion inpainter or an image-edit endpoint repaints whatever the mask lets it, but it does
not know where on a product a defect belongs, and it works at its own resolution. The procedural
engine does know (position words, the knowledge base's sub-region, the product's foreground, sizes
relative to the product), so model backends plan with it: the engine draws the defect once (the
*sketch*), its true region dilated by a margin becomes the edit mask, a window around that mask is cut
out and resized to the model's resolution, and the model's answer is resized back and pasted into the
normal image through the edit mask only. Nothing outside the mask changes; the result has the input's
size; and the reported region is what visibly changed inside the mask, so QE and MG stay meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from tools.image_gen import ProceduralEngine
from tools.mask_gen import change_mask
from tools.types import GenerationRequest, GenerationResult

#: Dilation of the defect's region that forms the edit mask, as a fraction of the defect's size
#: (square root of its area), and the least dilation in pixels: the model needs room for the outline.
MARGIN_FRACTION = 0.25
MIN_MARGIN = 4
#: The window around the edit mask is this many times the mask's box (context for the model)...
CONTEXT = 2.0
#: ...and at least this fraction of the image's shorter side (a tiny defect still gets some scene).
MIN_WINDOW_FRACTION = 0.25


@dataclass
class EditPlan:
    """A planned edit: the sketch, the defect's region, the edit mask and the window to send a model.

    Attributes:
        sketch: The procedurally drawn defect on the full image (uint8 RGB).
        region: The sketch's true defect region (bool, full size).
        edit_mask: The region dilated by `margin` (bool, full size): where the model may change pixels.
        window: (x0, y0, x1, y1), x1/y1 exclusive: the crop that goes to the model.
        margin: The dilation in pixels.
        sketch_result: The engine's full result (its spec and info describe the defect).
    """

    sketch: np.ndarray
    region: np.ndarray
    edit_mask: np.ndarray
    window: tuple[int, int, int, int]
    margin: int
    sketch_result: GenerationResult = field(repr=False)

    def crop(self, array: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = self.window
        return array[y0:y1, x0:x1]


class EmptyPlanError(RuntimeError):
    """The planner drew nothing visible, so there is no region to edit."""


def plan_edit(engine: ProceduralEngine, image: np.ndarray, request: GenerationRequest) -> EditPlan:
    """Place the defect with the procedural engine and derive the edit mask and window from it.

    Raises:
        EmptyPlanError: When the engine's defect came out invisible (no region).
    """
    result = engine.generate(image, request)
    region = result.region if result.region is not None else np.zeros(image.shape[:2], bool)
    if not region.any():
        raise EmptyPlanError(f"the procedural planner drew nothing visible for seed {request.seed}")
    margin = max(MIN_MARGIN, int(round(MARGIN_FRACTION * np.sqrt(region.sum()))))
    edit_mask = ndi.binary_dilation(region, ndi.generate_binary_structure(2, 1), iterations=margin)
    return EditPlan(result.image, region, edit_mask, square_window(edit_mask), margin, result)


def square_window(
    mask: np.ndarray, context: float = CONTEXT, min_fraction: float = MIN_WINDOW_FRACTION
) -> tuple[int, int, int, int]:
    """A square window (as far as the image allows) centred on the mask's box, `context` times its size.

    Returns:
        (x0, y0, x1, y1), x1/y1 exclusive, inside the image.
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    bx0, by0, bx1, by1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    side = int(np.ceil(max(bx1 - bx0, by1 - by0) * context))
    side = max(side, int(min_fraction * min(h, w)), 16)
    sw, sh = min(side, w), min(side, h)
    # The box must fit even when it is longer than the side on one axis of a small image.
    sw, sh = max(sw, bx1 - bx0), max(sh, by1 - by0)
    cx, cy = (bx0 + bx1) / 2.0, (by0 + by1) / 2.0
    x0 = int(np.clip(round(cx - sw / 2.0), 0, w - sw))
    y0 = int(np.clip(round(cy - sh / 2.0), 0, h - sh))
    return x0, y0, x0 + sw, y0 + sh


def model_size(window: tuple[int, int, int, int], resolution: int, multiple: int = 16) -> tuple[int, int]:
    """(width, height) to send a model: the window's long side at `resolution`, both a `multiple`."""
    x0, y0, x1, y1 = window
    ww, wh = x1 - x0, y1 - y0
    scale = resolution / max(ww, wh)
    width = max(multiple, int(round(ww * scale / multiple)) * multiple)
    height = max(multiple, int(round(wh * scale / multiple)) * multiple)
    return width, height


def to_model(array: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A uint8 RGB crop or a bool mask as a PIL image at `size` (width, height)."""
    if array.dtype == bool:
        return Image.fromarray(array.astype(np.uint8) * 255, "L").resize(size, Image.NEAREST)
    return Image.fromarray(np.ascontiguousarray(array)).resize(size, Image.LANCZOS)


def feather_alpha(edit_mask: np.ndarray, feather: float) -> np.ndarray:
    """Blend weight: 1 deep inside the edit mask, ramping to 0 at its border, exactly 0 outside."""
    depth = ndi.distance_transform_edt(edit_mask)
    return np.clip(depth / max(feather, 1.0), 0.0, 1.0).astype(np.float32) * edit_mask


def paste_back(normal: np.ndarray, generated: Image.Image | np.ndarray, plan: EditPlan) -> np.ndarray:
    """The normal image with the model's window output blended in through the edit mask only.

    Args:
        normal: uint8 RGB (H, W, 3), the image that was edited.
        generated: The model's output for the window, at any size (resized back to the window).
        plan: The plan whose window and edit mask apply.

    Returns:
        uint8 RGB of the input's size; pixels outside the edit mask equal `normal`'s.
    """
    x0, y0, x1, y1 = plan.window
    img = generated if isinstance(generated, Image.Image) else Image.fromarray(np.asarray(generated, np.uint8))
    patch = np.asarray(img.convert("RGB").resize((x1 - x0, y1 - y0), Image.LANCZOS), np.float32)
    alpha = feather_alpha(plan.edit_mask, plan.margin / 2.0)[y0:y1, x0:x1, None]
    out = normal.copy()
    window = normal[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(np.round(window * (1 - alpha) + patch * alpha), 0, 255).astype(np.uint8)
    return out


def edit_result(normal: np.ndarray, edited: np.ndarray, plan: EditPlan, info: dict[str, Any]) -> GenerationResult:
    """The backend's result: the edited image, what visibly changed inside the edit mask, and info.

    The info keeps the planner's description of the defect (shape, position, colour...) under
    ``plan`` and adds the area that really changed.
    """
    region = change_mask(normal, edited).mask & plan.edit_mask
    sketch_info = plan.sketch_result.info
    described = ("shape", "family", "position", "size", "contrast", "colour", "count")
    merged = {
        **{k: sketch_info[k] for k in described if k in sketch_info},
        **info,
        "window": list(plan.window),
        "edit_margin_px": plan.margin,
        "edit_mask_fraction": round(float(plan.edit_mask.mean()), 5),
        "planned_area_fraction": round(float(plan.region.mean()), 5),
        "area_fraction": round(float(region.mean()), 5),
    }
    return GenerationResult(image=edited, region=region, spec=plan.sketch_result.spec, info=merged)

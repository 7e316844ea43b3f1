"""MG's production backend: the change mask refined by segment-anything (SAM) from its bounding box.

Why refine: the change mask knows *where* the image changed but draws the outline by a threshold, so
a soft-edged or partly faint defect comes out ragged or too small. SAM, prompted with the change's
box, draws the object-level outline. Why intersect afterwards: SAM answers for the box, and a box
around a thin diagonal scratch also holds plenty of intact surface that SAM may take as "the object".
The final mask is therefore SAM's mask ∩ the change region dilated by a margin proportional to the
defect's size: SAM may only move the outline, never invent area far from what changed. When SAM's
answer keeps too little of the change (it segmented something else), the change mask is returned and
the result says so.

The checkpoint is a state dict from a local path (the official ``sam_vit_b_01ec64.pth`` ...). The
architecture is read from the state dict itself (embedding width, depth, heads, image size, global
attention blocks), so the official vit_b/l/h checkpoints and the tiny ones tests build load through
the same code; ``model_type`` vit_b/l/h checks the checkpoint is the one the user meant.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from tools.device_memory import out_of_memory_ends_the_run
from tools.mask_gen import change_mask
from tools.torchvision_compat import import_segment_anything
from tools.types import MaskResult

logger = logging.getLogger(__name__)

#: (embedding width, depth) of the published image encoders.
SAM_TYPES: dict[str, tuple[int, int]] = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}


class SamCheckpointError(ValueError):
    """The SAM checkpoint is missing, unreadable or not the architecture asked for."""


@dataclass(frozen=True)
class SamArchitecture:
    """What `segment_anything.modeling.Sam` needs to be built, as read from a state dict."""

    embed_dim: int
    depth: int
    num_heads: int
    img_size: int
    patch_size: int
    mlp_ratio: float
    window_size: int
    global_attn_indexes: tuple[int, ...]
    out_chans: int
    decoder_depth: int
    decoder_mlp_dim: int

    @property
    def name(self) -> str:
        for name, (dim, depth) in SAM_TYPES.items():
            if (self.embed_dim, self.depth) == (dim, depth) and self.img_size == 1024:
                return name
        return f"custom(dim {self.embed_dim}, depth {self.depth}, {self.img_size}px)"


def read_architecture(state: dict[str, torch.Tensor]) -> SamArchitecture:
    """The SAM architecture a state dict was saved from.

    Raises:
        SamCheckpointError: When the keys are not those of a SAM model.
    """
    try:
        proj = state["image_encoder.patch_embed.proj.weight"]
        pos = state["image_encoder.pos_embed"]
        blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
        embed_dim, patch = int(proj.shape[0]), int(proj.shape[2])
        grid = int(pos.shape[1])
        head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
        sizes = [(int(state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) + 1) // 2 for i in blocks]
        windowed = [s for s in sizes if s != grid]
        layers = {int(m.group(1)) for k in state if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
        return SamArchitecture(
            embed_dim=embed_dim,
            depth=len(blocks),
            num_heads=embed_dim // head_dim,
            img_size=grid * patch,
            patch_size=patch,
            mlp_ratio=int(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]) / embed_dim,
            # No windowed block: every block attends globally (window size 0 in segment-anything).
            window_size=windowed[0] if windowed else 0,
            global_attn_indexes=tuple(i for i, s in zip(blocks, sizes) if s == grid) if windowed else (),
            out_chans=int(state["image_encoder.neck.0.weight"].shape[0]),
            decoder_depth=len(layers),
            decoder_mlp_dim=int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
        )
    except (KeyError, IndexError) as error:
        raise SamCheckpointError(f"not a segment-anything state dict (no {error})") from None


def build_sam(arch: SamArchitecture) -> torch.nn.Module:
    """A `Sam` with `arch`'s shapes and random weights, built as segment-anything's `_build_sam` does."""
    sam_pkg = import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    grid = arch.img_size // arch.patch_size
    model = sam_pkg.modeling.Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.depth,
            embed_dim=arch.embed_dim,
            img_size=arch.img_size,
            mlp_ratio=arch.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.out_chans,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.out_chans,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth, embedding_dim=arch.out_chans, mlp_dim=arch.decoder_mlp_dim, num_heads=8
            ),
            transformer_dim=arch.out_chans,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return model.eval()


def published_architecture(model_type: str, img_size: int = 1024) -> SamArchitecture:
    """The architecture of a published SAM type (vit_b/l/h), e.g. to build it with random weights."""
    dim, depth = SAM_TYPES[model_type]
    heads = 12 if model_type == "vit_b" else 16
    step = depth // 4
    return SamArchitecture(
        embed_dim=dim, depth=depth, num_heads=heads, img_size=img_size, patch_size=16, mlp_ratio=4.0,
        window_size=14, global_attn_indexes=tuple(step * k - 1 for k in range(1, 5)), out_chans=256,
        decoder_depth=2, decoder_mlp_dim=2048,
    )


def resolve_device(device: str = "auto") -> str:
    """``auto`` is CUDA when torch sees a GPU, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@lru_cache(maxsize=2)
def load_sam(checkpoint: str, model_type: str = "auto", device: str = "auto") -> torch.nn.Module:
    """SAM from a local checkpoint, once per process and (path, type, device).

    Args:
        checkpoint: Path of a SAM state dict (``.pth``).
        model_type: ``auto`` (whatever the checkpoint holds) or vit_b / vit_l / vit_h, checked.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...

    Raises:
        SamCheckpointError: One line naming ``sam_checkpoint`` or ``sam_model_type``.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise SamCheckpointError(
            f"sam_checkpoint {checkpoint} does not exist; download a SAM checkpoint (e.g. sam_vit_b_01ec64.pth) "
            "and set sam_checkpoint to its local path"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike: the file is not a state dict
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SamCheckpointError(f"sam_checkpoint {checkpoint} could not be read: {detail}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    arch = read_architecture(state)
    if model_type != "auto" and arch.name != model_type:
        raise SamCheckpointError(
            f"sam_model_type is {model_type} but sam_checkpoint {checkpoint} holds {arch.name}; "
            "fix sam_model_type or set it to auto"
        )
    model = build_sam(arch)
    model.load_state_dict(state)
    model.to(resolve_device(device))
    logger.info("loaded SAM %s from %s on %s", arch.name, path, resolve_device(device))
    return model


def refine_with_sam(
    change: np.ndarray, sam_masks: np.ndarray, sam_scores: np.ndarray, *, margin_fraction: float = 0.15,
    min_margin: int = 2, min_keep: float = 0.3,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Combine a change mask with SAM's candidate masks for its box.

    Args:
        change: Bool (H, W), the change mask (non-empty).
        sam_masks: Bool (C, H, W), SAM's candidates for the change's box.
        sam_scores: (C,) SAM's predicted IoUs, used to break ties.
        margin_fraction: Dilation of the change region, as a fraction of the defect's size
            (square root of its area): how far SAM may move the outline.
        min_margin: The least dilation in pixels.
        min_keep: The refined mask must cover at least this fraction of the change mask; otherwise SAM
            segmented something else and the change mask is kept.

    Returns:
        (final bool mask, info with the chosen candidate, the margin and whether SAM was used).
    """
    area = int(change.sum())
    margin = max(min_margin, int(round(margin_fraction * np.sqrt(area))))
    allowed = ndi.binary_dilation(change, ndi.generate_binary_structure(2, 1), iterations=margin)
    best, best_key = None, (-1.0, -np.inf)
    for i, candidate in enumerate(np.asarray(sam_masks, bool)):
        refined = candidate & allowed
        inter = float((refined & change).sum())
        iou = inter / max(float((refined | change).sum()), 1.0)
        key = (iou, float(sam_scores[i]))
        if key > best_key:
            best, best_key = (i, refined, inter / max(area, 1)), key
    info: dict[str, Any] = {"margin_px": margin}
    if best is None or best[2] < min_keep:
        info.update({"sam": "fallback", "sam_keep": round(best[2], 3) if best else 0.0})
        return change.copy(), info
    index, refined, keep = best
    refined = ndi.binary_fill_holes(refined)
    info.update({"sam": "refined", "sam_candidate": index, "sam_score": round(float(sam_scores[index]), 3),
                 "sam_iou_with_change": round(best_key[0], 3), "sam_keep": round(keep, 3)})
    return refined, info


class SamMaskGenerator:
    """`MaskGenerator` backend: the change mask refined by SAM (see the module docstring).

    Args:
        checkpoint: Local SAM checkpoint (``sam_checkpoint``).
        model_type: ``auto`` or vit_b / vit_l / vit_h (``sam_model_type``).
        device: ``auto``, ``cpu``, ``cuda``...
        box_pad: Pixels added around the change's box before it prompts SAM.
    """

    def __init__(self, checkpoint: str, model_type: str = "auto", device: str = "auto", box_pad: int = 4) -> None:
        self.model = load_sam(checkpoint, model_type, device)
        self.box_pad = box_pad
        self._lock = threading.Lock()  # a predictor holds one image at a time; batch workers share it
        sam_pkg = import_segment_anything()
        self._predictor = sam_pkg.SamPredictor(self.model)

    def generate(self, normal: np.ndarray, edited: np.ndarray) -> MaskResult:
        """The refined mask of what changed from `normal` to `edited`."""
        base = change_mask(normal, edited)
        if base.box is None:
            base.info["sam"] = "skipped (nothing changed)"
            return base
        h, w = base.mask.shape
        x0, y0, x1, y1 = base.box
        p = self.box_pad
        box = np.array([max(0, x0 - p), max(0, y0 - p), min(w, x1 + p), min(h, y1 + p)], np.float32)
        hint = "use a smaller sam_model_type or mask_backend: change, or free the GPU, then batch --resume"
        with self._lock, torch.inference_mode(), out_of_memory_ends_the_run("SAM", hint):
            self._predictor.set_image(np.ascontiguousarray(edited))
            masks, scores, _ = self._predictor.predict(box=box, multimask_output=True)
            self._predictor.reset_image()
        mask, info = refine_with_sam(base.mask, masks, scores)
        ys, xs = np.nonzero(mask)
        result_box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if ys.size else None
        info = {**base.info, **info, "area_fraction": round(float(mask.mean()), 5), "change_area_fraction":
                base.info.get("area_fraction")}
        return MaskResult(mask=mask, box=result_box, info=info)

"""MG's SAM backend: the torchvision stand-ins, checkpoint loading, and the refinement rule."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from evals.random_backends import sam_checkpoint
from graph.configuration import Configuration, ConfigurationError
from graph.toolbox import get_toolbox
from tools import torchvision_compat as tvc
from tools.mask_gen import change_mask


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth", "tiny")


def _pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = (rng.random((96, 128, 3)) * 30 + 110).astype(np.uint8)
    edited = normal.copy()
    yy, xx = np.mgrid[0:96, 0:128]
    edited[((yy - 40) / 12.0) ** 2 + ((xx - 60) / 20.0) ** 2 <= 1] = 30  # a dark elliptical stain
    return normal, edited


# ----------------------------------------------------------------------------- torchvision stand-ins


def test_stand_in_resize_and_to_pil_image_match_segment_anythings_use():
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    pil = tvc.to_pil_image(image)
    assert pil.size == (50, 30)
    resized = np.array(tvc.resize(pil, (60, 100)))  # (h, w), as ResizeLongestSide passes it
    assert resized.shape == (60, 100, 3)
    assert abs(float(resized.mean()) - float(image.mean())) < 3
    assert tvc.resize(pil, 15).size == (25, 15)  # an int resizes the shorter side


def test_stand_in_batched_nms_suppresses_within_a_category_only():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    idxs = torch.tensor([0, 0, 1, 0])
    keep = tvc.batched_nms(boxes, scores, idxs, 0.5)
    assert keep.tolist() == [0, 2, 3]  # box 1 overlaps box 0 (same category); box 2 is another category
    assert tvc.box_area(boxes).tolist() == [100, 81, 100, 100]
    assert tvc.batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0), 0.5).numel() == 0


def test_stand_ins_are_removed_after_segment_anything_is_imported():
    segment_anything = tvc.import_segment_anything()
    assert hasattr(segment_anything, "SamPredictor")
    if not tvc.torchvision_available():
        assert "torchvision" not in sys.modules  # transformers and others must not see a fake package
        from segment_anything.utils import transforms

        assert transforms.resize is tvc.resize


# ------------------------------------------------------------------------------------- refinement rule


def test_refinement_keeps_sams_outline_only_near_the_change():
    normal, edited = _pair()
    change = change_mask(normal, edited).mask
    everything = np.ones((1, *change.shape), bool)
    mask, info = _refine(change, everything)
    # SAM says "the whole box": the result is the change grown by the margin, nothing further away.
    grown = ndi.binary_dilation(change, ndi.generate_binary_structure(2, 1), iterations=info["margin_px"])
    assert info["sam"] == "refined" and np.array_equal(mask, grown)


def test_refinement_falls_back_to_the_change_mask_when_sam_misses_it():
    normal, edited = _pair()
    change = change_mask(normal, edited).mask
    elsewhere = np.zeros((1, *change.shape), bool)
    elsewhere[0, 80:, 100:] = True
    mask, info = _refine(change, elsewhere)
    assert info["sam"] == "fallback" and np.array_equal(mask, change)


def _refine(change: np.ndarray, candidates: np.ndarray):
    from tools.mask_gen_sam import refine_with_sam

    return refine_with_sam(change, candidates, np.ones(len(candidates)))


# ----------------------------------------------------------------------------------- the real model


def test_checkpoint_architecture_is_read_from_the_state_dict(tiny_sam):
    from tools.mask_gen_sam import load_sam, read_architecture

    arch = read_architecture(torch.load(tiny_sam, weights_only=True))
    assert (arch.embed_dim, arch.depth, arch.img_size, arch.global_attn_indexes) == (32, 2, 256, (1,))
    model = load_sam(str(tiny_sam), "auto", "cpu")
    assert model.image_encoder.img_size == 256


def test_sam_backend_through_the_configuration_gives_a_mask_near_the_change(tiny_sam):
    cfg = Configuration.load(overrides={"mask_backend": "sam", "sam_checkpoint": str(tiny_sam), "torch_device": "cpu"})
    generator = get_toolbox(cfg).mask
    normal, edited = _pair()
    result = generator.generate(normal, edited)
    change = change_mask(normal, edited).mask
    assert result.mask.shape == normal.shape[:2] and result.mask.any()
    assert result.info["sam"] in ("refined", "fallback")
    grown = ndi.binary_dilation(change, ndi.generate_binary_structure(2, 1), iterations=result.info["margin_px"])
    assert not (result.mask & ~grown).any()
    assert result.box is not None


def test_sam_that_answers_the_whole_box_gives_the_grown_change(tiny_sam):
    """With the decoder's threshold lowered, the real model answers 'all of it': the rule must clip it."""
    from tools.mask_gen_sam import SamMaskGenerator

    generator = SamMaskGenerator(str(tiny_sam), device="cpu")
    generator.model.mask_threshold = -1e9
    try:
        normal, edited = _pair(1)
        result = generator.generate(normal, edited)
    finally:
        del generator.model.mask_threshold  # the model is cached per process: restore the class default
    change = change_mask(normal, edited).mask
    grown = ndi.binary_dilation(change, ndi.generate_binary_structure(2, 1), iterations=result.info["margin_px"])
    assert result.info["sam"] == "refined" and np.array_equal(result.mask, grown)


def test_nothing_changed_gives_an_empty_mask_without_running_sam(tiny_sam):
    from tools.mask_gen_sam import SamMaskGenerator

    normal, _ = _pair()
    result = SamMaskGenerator(str(tiny_sam), device="cpu").generate(normal, normal.copy())
    assert not result.mask.any() and result.box is None and result.info["sam"].startswith("skipped")


def test_missing_or_wrong_checkpoint_is_one_line_naming_the_key(tmp_path, tiny_sam):
    with pytest.raises(ConfigurationError, match="sam_checkpoint") as error:
        get_toolbox(Configuration.load(overrides={"mask_backend": "sam", "sam_checkpoint": str(tmp_path / "no.pth")}))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigurationError, match="sam_checkpoint"):
        get_toolbox(Configuration.load(overrides={"mask_backend": "sam"}))
    with pytest.raises(ConfigurationError, match="sam_model_type is vit_h"):
        get_toolbox(Configuration.load(overrides={"mask_backend": "sam", "sam_checkpoint": str(tiny_sam),
                                                  "sam_model_type": "vit_h"}))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigurationError, match="could not be read"):
        get_toolbox(Configuration.load(overrides={"mask_backend": "sam", "sam_checkpoint": str(junk)}))

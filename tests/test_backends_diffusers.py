"""IG's diffusers backend and MG's SAM backend on tiny random models built offline, loaded from disk.

The pipeline folder and the SAM checkpoint are written by `evals.random_backends` in the layouts the
production code loads (save_pretrained folders, state dicts), and are loaded through the same
configuration keys a user sets: nothing here bypasses the production load path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evals.random_backends import sam_checkpoint, sd_inpaint_pipeline
from graph.configuration import Configuration, ConfigurationError
from graph.graph import build_graph, recursion_limit
from graph.toolbox import get_toolbox
from tools.imaging import load_image, load_mask
from tools.types import GenerationRequest


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sd_inpaint_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-inpaint", size="tiny")


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sam_checkpoint(tmp_path_factory.mktemp("models") / "tiny_sam.pth", "tiny")


@pytest.fixture(scope="module")
def nut(sample_dir: Path) -> np.ndarray:
    return load_image(sorted((sample_dir / "metal_nut").glob("*.png"))[0])


def _inpainter(path: Path, **overrides):
    cfg = Configuration.load(overrides={"image_backend": "diffusers", "diffusion_model_path": str(path),
                                        "diffusion_steps": 3, **overrides})
    return get_toolbox(cfg).image


REQUEST = GenerationRequest(prompt="a small dark scratch at the top-left", category="metal_nut",
                            anomaly_type="scratch", default_shape="scratch", seed=3)


def test_diffusers_edit_keeps_size_and_changes_only_inside_the_planned_mask(tiny_sd, nut):
    from tools.edit_region import plan_edit
    from tools.image_gen import ProceduralEngine

    result = _inpainter(tiny_sd).generate(nut, REQUEST)
    plan = plan_edit(ProceduralEngine(), nut, REQUEST)  # the same plan: same seed, same placement
    assert result.image.shape == nut.shape and result.image.dtype == np.uint8
    changed = np.abs(result.image.astype(int) - nut.astype(int)).max(axis=-1) > 0
    assert changed.any()
    assert not (changed & ~plan.edit_mask).any(), "pixels outside the edit mask changed"
    assert result.region is not None and result.region.any() and not (result.region & ~plan.edit_mask).any()
    assert result.info["engine"] == "diffusers" and result.info["pipeline"] == "StableDiffusionInpaintPipeline"
    assert result.info["model_size"] == [64, 64]  # the tiny pipeline's native resolution
    assert result.info["position"] == "top-left"


def test_diffusers_edit_is_seeded(tiny_sd, nut):
    inpainter = _inpainter(tiny_sd)
    first = inpainter.generate(nut, REQUEST).image
    again = inpainter.generate(nut, REQUEST).image
    other = inpainter.generate(nut, REQUEST.model_copy(update={"seed": 4})).image
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_strength_steps_guidance_come_from_the_configuration(tiny_sd, nut):
    result = _inpainter(tiny_sd, diffusion_strength=0.5, diffusion_steps=2, diffusion_guidance=2.0,
                        edit_init="normal", diffusion_resolution=96).generate(nut, REQUEST)
    assert (result.info["strength"], result.info["steps"], result.info["guidance"]) == (0.5, 2, 2.0)
    assert result.info["init"] == "normal" and result.info["model_size"] == [96, 96]


def test_a_prompt_too_long_for_clip_loses_its_location_clauses_first():
    from evals.random_backends import tiny_clip_tokenizer
    from tools.image_gen_diffusers import fit_to_text_encoder

    tokenizer = tiny_clip_tokenizer()  # one token per character, CLIP's limit of 77
    short = "photo of a nut with a dent defect. A dent."
    assert fit_to_text_encoder(short, tokenizer) == short and fit_to_text_encoder(short * 3, None) == short * 3
    long = "photo of a nut with a dent defect. A deep dent, soft edges, anywhere on the nut, on the rim region."
    fitted = fit_to_text_encoder(long, tokenizer)
    assert fitted == "photo of a nut with a dent defect. A deep dent, soft edges." and len(tokenizer(fitted).input_ids) <= 77
    longer = "photo of a nut with a dent defect. A deep dent, soft rounded edges, low contrast, a sharp dark rim, anywhere on the nut."
    assert fit_to_text_encoder(longer, tokenizer) == "photo of a nut with a dent defect. A deep dent, soft rounded edges, low contrast."


def test_the_pipeline_reads_the_fitted_prompt(tiny_sd, nut):
    request = REQUEST.model_copy(update={"prompt": "a small dark scratch, thin and straight, anywhere on the metal nut"})
    info = _inpainter(tiny_sd).generate(nut, request).info
    assert "anywhere" not in info["model_prompt"] and "scratch" in info["model_prompt"]


def test_the_pipeline_loads_once_per_process(tiny_sd):
    from tools.image_gen_diffusers import load_pipeline

    a = _inpainter(tiny_sd, diffusion_strength=0.6)
    b = _inpainter(tiny_sd, diffusion_strength=0.9)
    assert a is not b and a.pipe is b.pipe
    assert load_pipeline.cache_info().currsize >= 1


def test_missing_model_path_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigurationError, match="diffusion_model_path") as error:
        _inpainter(tmp_path / "no-such-model")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigurationError, match="diffusion_model_path"):
        get_toolbox(Configuration.load(overrides={"image_backend": "diffusers"}))
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(ConfigurationError, match="model_index.json"):
        _inpainter(tmp_path / "not-a-pipeline")


def test_pipeline_family_is_read_from_model_index(tmp_path):
    from tools.image_gen_diffusers import pipeline_kind

    for class_name, kind in [("FluxFillPipeline", "flux-fill"), ("QwenImageEditPipeline", "qwen-edit-inpaint"),
                             ("StableDiffusionXLInpaintPipeline", "inpaint")]:
        folder = tmp_path / class_name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        assert pipeline_kind(folder) == kind


def test_device_and_dtype_auto_is_cpu_float32_without_a_gpu():
    import torch

    from tools.image_gen_diffusers import resolve_device_dtype

    if torch.cuda.is_available():
        assert resolve_device_dtype() == ("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        assert resolve_device_dtype() == ("cpu", torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16") == ("cpu", torch.bfloat16)


def test_graph_runs_end_to_end_with_diffusers_ig_and_sam_mg(tiny_sd, tiny_sam, sample_dir, tmp_path):
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    configurable = {"image_backend": "diffusers", "diffusion_model_path": str(tiny_sd), "diffusion_steps": 3,
                    "mask_backend": "sam", "sam_checkpoint": str(tiny_sam), "max_image_gens": 2}
    cfg = Configuration.load(overrides=configurable)
    state = build_graph().invoke(
        {"image": str(image), "category": "metal_nut", "anomaly_type": "scratch", "seed": 1, "run_dir": str(tmp_path / "run")},
        {"configurable": configurable, "recursion_limit": recursion_limit(cfg)},
    )
    result = state["result"]
    assert state["status"] in ("success", "budget_exhausted")
    normal, anomaly = load_image(image), load_image(result["anomaly_path"])
    mask = load_mask(result["mask_path"])
    assert anomaly.shape == normal.shape and mask.shape == normal.shape[:2]
    assert mask.any() and not np.array_equal(anomaly, normal)
    record = json.loads(Path(result["trajectory_path"]).read_text())
    assert record["generations"] and all(g["info"]["engine"] == "diffusers" for g in record["generations"].values())
    assert record["calls"][-1] == "mask_gen" or result["mask_by"] == "finalize"
    assert result["mask_iou"] > 0  # the SAM-refined mask overlaps the region the backend reported
    # The mask lies where the image changed (SAM may only move the outline near the change).
    changed = np.abs(anomaly.astype(int) - normal.astype(int)).max(axis=-1) > 0
    from scipy import ndimage as ndi

    assert not (mask & ~ndi.binary_dilation(changed, iterations=12)).any()


def test_gpu_open_preset_builds_diffusers_and_sam_from_local_paths(tiny_sd, tiny_sam, monkeypatch):
    from tools.image_gen_diffusers import DiffusersInpainter
    from tools.mask_gen_sam import SamMaskGenerator

    monkeypatch.setenv("ANOMALY_AGENT_DIFFUSION_MODEL_PATH", str(tiny_sd))
    monkeypatch.setenv("ANOMALY_AGENT_SAM_CHECKPOINT", str(tiny_sam))
    monkeypatch.setenv("ANOMALY_AGENT_SAM_MODEL_TYPE", "auto")
    toolbox = get_toolbox(Configuration.load(config_file="gpu-open"))
    assert isinstance(toolbox.image, DiffusersInpainter) and isinstance(toolbox.mask, SamMaskGenerator)


def test_flux_fill_folder_runs_through_the_flux_fill_pipeline(tmp_path, nut):
    from evals.random_backends import flux_fill_pipeline

    folder = flux_fill_pipeline(tmp_path / "tiny-flux-fill")
    inpainter = _inpainter(folder, diffusion_steps=2, diffusion_resolution=32)
    result = inpainter.generate(nut, REQUEST)
    assert result.info["pipeline"] == "FluxFillPipeline" and result.info["guidance"] == 30.0
    assert result.image.shape == nut.shape and result.region.any()
    assert result.info["model_size"] == [32, 32]  # FLUX packs 2×2 latents: sizes are multiples of 16


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ANOMALY_AGENT_IMAGE_BACKEND": "diffusers", "ANOMALY_AGENT_DIFFUSION_MODEL_PATH": "/nonexistent/sd"}, "diffusion_model_path"),
        ({"ANOMALY_AGENT_MASK_BACKEND": "sam", "ANOMALY_AGENT_SAM_CHECKPOINT": "/nonexistent/sam.pth"}, "sam_checkpoint"),
    ],
    ids=["diffusers-path", "sam-checkpoint"],
)
def test_batch_stops_before_any_sample_on_a_missing_model_file(env, expected, sample_dir, tmp_path, monkeypatch, capsys):
    from anomaly_agent_cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    code = main(["batch", "--input", str(sample_dir / "metal_nut"), "--category", "metal_nut",
                 "--anomaly-types", "color", "--per-image", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0]
    assert not out.exists(), "nothing may be written before the check passes"


def test_sdxl_inpainting_folder_runs_through_the_auto_pipeline(tmp_path, nut):
    from evals.random_backends import sdxl_inpaint_pipeline

    folder = sdxl_inpaint_pipeline(tmp_path / "sdxl", size="tiny")
    inpainter = _inpainter(folder, diffusion_steps=2)
    assert type(inpainter.pipe).__name__ == "StableDiffusionXLInpaintPipeline"
    result = inpainter.generate(nut, GenerationRequest(prompt="a large dark stain", category="metal_nut",
                                                       anomaly_type="color", default_shape="stain", seed=3))
    assert result.image.shape == nut.shape and result.region is not None and result.region.any()


def _out_of_memory(*args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")


@pytest.mark.parametrize("tool", ["image_gen", "mask_gen"])
def test_device_out_of_memory_ends_the_run_as_backend_error(tool, tiny_sd, tiny_sam, sample_dir, tmp_path, monkeypatch):
    """A GPU running out of memory mid-run is the machine failing: the run ends `backend_error` with the
    reason (batch --resume retries it), never a crash. The OOM itself cannot happen on this CPU machine, so
    the model call raises torch's own OutOfMemoryError in its place."""
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    configurable = {"image_backend": "diffusers", "diffusion_model_path": str(tiny_sd), "diffusion_steps": 3,
                    "mask_backend": "sam", "sam_checkpoint": str(tiny_sam), "max_image_gens": 2}
    cfg = Configuration.load(overrides=configurable)
    toolbox = get_toolbox(cfg)
    if tool == "image_gen":
        monkeypatch.setattr(toolbox.image, "pipe", _out_of_memory)
    else:
        monkeypatch.setattr(toolbox.mask._predictor, "predict", _out_of_memory)
    state = build_graph().invoke(
        {"image": str(image), "category": "metal_nut", "anomaly_type": "scratch", "seed": 1, "run_dir": str(tmp_path / "run")},
        {"configurable": configurable, "recursion_limit": recursion_limit(cfg)},
    )
    assert state["status"] == "backend_error"
    error = state["result"]["error"]
    assert "ran out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB" in error
    assert ("diffusers at" if tool == "image_gen" else "SAM ran out") in error
    assert ("diffusion_resolution" if tool == "image_gen" else "sam_model_type") in error
    if tool == "mask_gen":  # the image is kept, masked without the model that failed
        assert state["result"]["mask_by"].startswith("finalize (change mask") and load_mask(state["result"]["mask_path"]).any()


def test_a_flux_dev_folder_is_guidance_distilled_one_pass_per_step(tmp_path, nut):
    """AutoPipelineForInpainting maps a FLUX.1 text-to-image folder to FluxInpaintPipeline, which also has
    `true_cfg_scale`: FLUX.1 is guidance-distilled, so every transformer pass must read the prompt (no
    negative-prompt pass) with the embedded guidance at FLUX.1 dev's 3.5."""
    from evals.random_backends import flux_pipeline

    inpainter = _inpainter(flux_pipeline(tmp_path / "tiny-flux"), diffusion_steps=4, diffusion_resolution=32,
                           diffusion_strength=1.0)
    assert type(inpainter.pipe).__name__ == "FluxInpaintPipeline"
    passes = []

    def record(module, args, kwargs):
        passes.append((kwargs["encoder_hidden_states"].clone(), kwargs["guidance"].clone()))

    handle = inpainter.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = inpainter.generate(nut, REQUEST)
    finally:
        handle.remove()
    assert len(passes) == 4, "one transformer pass per step: no true-CFG second pass"
    assert all(torch_equal(states, passes[0][0]) for states, _ in passes), "a pass read another (negative) prompt"
    assert all(float(guidance.flatten()[0]) == 3.5 for _, guidance in passes)
    assert result.info["guidance"] == 3.5 and result.info["guidance_mode"] == "distilled"


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def test_guidance_follows_the_pipeline_family():
    import diffusers

    from tools.image_gen_diffusers import guidance_plan

    assert guidance_plan(diffusers.QwenImageEditInpaintPipeline) == ("true_cfg", 4.0)
    assert guidance_plan(diffusers.QwenImageInpaintPipeline) == ("true_cfg", 4.0)
    assert guidance_plan(diffusers.FluxFillPipeline) == ("distilled", 30.0)
    assert guidance_plan(diffusers.FluxInpaintPipeline) == ("distilled", 3.5)
    assert guidance_plan(diffusers.StableDiffusionInpaintPipeline) == ("cfg", 7.5)
    assert guidance_plan(diffusers.StableDiffusion3InpaintPipeline) == ("cfg", 7.0)


@pytest.mark.parametrize(("class_name", "family", "problem"), [
    ("IFPipeline", "if", "takes no height/width"),
    ("KandinskyV22Pipeline", "kandinsky22", "takes no strength"),
    ("StableDiffusionControlNetPipeline", "stable-diffusion-controlnet", "needs a control image"),
    ("FluxControlPipeline", "flux-control", "needs a control image"),
])
def test_a_family_the_backend_cannot_drive_is_refused_at_load_in_one_line(tmp_path, class_name, family, problem):
    folder = tmp_path / class_name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    with pytest.raises(ConfigurationError) as error:
        _inpainter(folder)
    message = str(error.value)
    assert "\n" not in message and f"'{family}' folder" in message and problem in message

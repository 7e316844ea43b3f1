"""IG's production backend: a diffusers inpainting/editing pipeline loaded from a local folder.

Why this shape: a diffusion inpainter makes realistic texture but has no idea where a defect belongs
or how large it should be. The procedural engine decides that (see `tools.edit_region`): it sketches
the defect, the sketch's region dilated by a margin is the inpainting mask, and a window around it
goes to the pipeline at the pipeline's own resolution. By default the sketch is the init image, so the
pipeline (at `strength` < 1) turns a drawn scratch into a photographed one while keeping its place and
shape; ``edit_init: normal`` lets it paint from the prompt alone. The output is pasted back through the
mask, so the result has the input's size and nothing outside the mask changes.

Supported folders (``save_pretrained`` layouts with ``model_index.json``): FLUX.1 Fill
(``FluxFillPipeline``), Qwen-Image-Edit (``QwenImageEditInpaintPipeline``), and the folders
``AutoPipelineForInpainting`` maps to a pipeline that takes an image, a mask, a size and a strength
and needs no control image: SD 1.5/2, SDXL, SD3, FLUX.1 dev/schnell, Qwen-Image, Z-Image (and their
PAG variants). The others it maps (DeepFloyd IF, Kandinsky, ControlNet and FLUX Control) are refused
at load with one line naming the family. Guidance follows the family (`guidance_plan`). Pipelines
load once per process per (path, kind, device, dtype); nothing is downloaded.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.device_memory import out_of_memory_ends_the_run
from tools.edit_region import edit_result, model_size, paste_back, plan_edit, to_model
from tools.image_gen import ProceduralEngine
from tools.types import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

#: Arguments `DiffusersInpainter.generate` passes every pipeline; a family whose call lacks one is refused.
CALL_ARGUMENTS = ("prompt", "image", "mask_image", "height", "width", "strength", "num_inference_steps", "generator")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DiffusersModelError(ValueError):
    """The diffusion model folder is missing or is not a pipeline this backend can run."""


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """``auto``: CUDA with bfloat16 (float16 where the GPU lacks bf16) when a GPU is there, else CPU float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, torch.float32
    if dtype not in DTYPES:
        raise DiffusersModelError(f"torch_dtype must be auto or one of {', '.join(DTYPES)}; got {dtype}")
    return device, DTYPES[dtype]


def pipeline_kind(model_path: str | Path, kind: str = "auto") -> str:
    """``inpaint`` (AutoPipelineForInpainting), ``flux-fill`` or ``qwen-edit-inpaint`` for a model folder.

    Raises:
        DiffusersModelError: One line naming ``diffusion_model_path`` when the folder is not a pipeline.
    """
    path = Path(model_path).expanduser()
    index = path / "model_index.json"
    if not path.is_dir():
        raise DiffusersModelError(
            f"diffusion_model_path {model_path} does not exist; set diffusion_model_path to a local diffusers "
            "pipeline folder (e.g. one written by save_pretrained or `hf download`)"
        )
    if not index.is_file():
        raise DiffusersModelError(
            f"diffusion_model_path {model_path} has no model_index.json; it must be a diffusers pipeline folder"
        )
    if kind != "auto":
        return kind
    class_name = str(json.loads(index.read_text()).get("_class_name", ""))
    if class_name.startswith("FluxFill"):
        return "flux-fill"
    if class_name.startswith("QwenImageEdit"):
        return "qwen-edit-inpaint"
    return "inpaint"


def guidance_plan(pipeline_class: type) -> tuple[str, float]:
    """How a pipeline family takes guidance, and its usual scale when the configuration gives none.

    ``true_cfg``: Qwen-Image models are not guidance-distilled; guidance is a second transformer pass
    on a negative prompt (`true_cfg_scale`). ``distilled``: FLUX.1 models are guidance-distilled; the
    scale is an input of the transformer (`guidance_scale`: Fill 30, dev 3.5) and a second pass would
    only double the cost and oversaturate. ``cfg``: classic classifier-free guidance (`guidance_scale`,
    the pipeline's own default: SD 7.5, SD3 7, Z-Image 5).
    """
    name = pipeline_class.__name__
    if name.startswith("QwenImage"):
        return "true_cfg", 4.0
    if name.startswith("FluxFill"):
        return "distilled", 30.0
    if name.startswith("Flux"):
        return "distilled", 3.5
    default = inspect.signature(pipeline_class.__call__).parameters.get("guidance_scale")
    value = default.default if default is not None else None
    return "cfg", float(value) if isinstance(value, (int, float)) else 7.5


def pipeline_class(model_path: str | Path, kind: str) -> type:
    """The pipeline class a folder loads as, refused unless `DiffusersInpainter` can drive it.

    Raises:
        DiffusersModelError: One line naming the family when its pipeline lacks an argument this backend
            passes, needs a control image, or is not an inpainting pipeline at all.
    """
    import diffusers  # heavy (seconds); only when this backend is chosen
    from diffusers.pipelines.auto_pipeline import AUTO_INPAINT_PIPELINES_MAPPING, _get_task_class

    if kind == "flux-fill":
        return diffusers.FluxFillPipeline
    if kind == "qwen-edit-inpaint":
        return diffusers.QwenImageEditInpaintPipeline
    class_name = str(json.loads((Path(model_path).expanduser() / "model_index.json").read_text()).get("_class_name", ""))
    try:
        cls = _get_task_class(AUTO_INPAINT_PIPELINES_MAPPING, class_name)
    except ValueError:
        raise DiffusersModelError(
            f"diffusion_model_path {model_path} holds a {class_name or 'pipeline without _class_name'}, which has no "
            "inpainting pipeline in diffusers; use an inpainting-capable family (SD, SDXL, SD3, FLUX.1, Qwen-Image, Z-Image)"
        ) from None
    family = next((key for key, value in AUTO_INPAINT_PIPELINES_MAPPING.items() if value is cls), cls.__name__)
    accepted = inspect.signature(cls.__call__).parameters
    missing = [name for name in CALL_ARGUMENTS if name not in accepted]
    problem = (f"its pipeline takes no {'/'.join(missing)}" if missing else
               "it needs a control image" if "control_image" in accepted else None)
    if problem:
        raise DiffusersModelError(
            f"diffusion_model_path {model_path} is a '{family}' folder ({cls.__name__}), which this backend cannot "
            f"drive: {problem}; use SD, SDXL, SD3, FLUX.1, Qwen-Image or Z-Image inpainting, FLUX.1 Fill or Qwen-Image-Edit"
        )
    return cls


@lru_cache(maxsize=2)
def load_pipeline(model_path: str, kind: str = "auto", device: str = "auto", dtype: str = "auto") -> Any:
    """The pipeline in `model_path`, loaded once per process and (path, kind, device, dtype).

    Raises:
        DiffusersModelError: When the folder is missing, not a pipeline, or does not load.
    """
    kind = pipeline_kind(model_path, kind)
    device_name, torch_dtype = resolve_device_dtype(device, dtype)
    loader = pipeline_class(model_path, kind)  # the class AutoPipelineForInpainting would pick, checked
    index = json.loads((Path(model_path).expanduser() / "model_index.json").read_text())
    extra: dict[str, Any] = {}
    if "safety_checker" in index:
        # The NSFW filter blacks out false positives; industrial close-ups are none of its business.
        extra.update(safety_checker=None, requires_safety_checker=False)
    # diffusers renamed `torch_dtype` to `dtype` (0.36+); older releases know only the first.
    from diffusers.utils import deprecation_utils

    extra["dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"] = torch_dtype
    started = time.perf_counter()
    try:
        pipe = loader.from_pretrained(str(Path(model_path).expanduser()), local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise DiffusersModelError(
            f"diffusion_model_path {model_path} did not load as a {kind} pipeline: {str(error).splitlines()[0]}"
        ) from None
    pipe.to(device_name)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded %s from %s on %s/%s in %.1fs", type(pipe).__name__, model_path, device_name,
                str(torch_dtype).removeprefix("torch."), time.perf_counter() - started)
    return pipe


def native_resolution(pipe: Any) -> int:
    """The long side a pipeline was trained at (SD 1.5: 512, SDXL/FLUX/Qwen: 1024)."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "default_sample_size", None):
        return int(pipe.default_sample_size) * scale
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        size = unet.config.sample_size
        return int(size if isinstance(size, int) else max(size)) * scale
    return 1024


def model_prompt(request: GenerationRequest, shape: str | None) -> str:
    """The text the pipeline reads: what the object is, the defect, then the agent's instruction."""
    subject = request.category.replace("_", " ")
    defect = request.anomaly_type.replace("_", " ")
    kind = f"{shape} " if shape and shape not in defect else ""
    return f"close-up inspection photo of a {subject} with a {kind}{defect} defect. {request.prompt}"


#: First words of a clause that only says where the defect goes ("anywhere on the tile", "on the shell
#: region"): this backend's mask already decides that, so these clauses are dropped first to fit CLIP.
LOCATION_WORDS = ("anywhere", "on", "near", "at", "along", "across", "around", "over", "in", "inside", "within")


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text).input_ids)


def fit_to_text_encoder(prompt: str, tokenizer: Any | None) -> str:
    """The prompt cut to what a CLIP text encoder reads, dropping the least useful clauses first.

    Why: SD and SDXL pipelines silently cut the prompt at the tokenizer's 77 tokens, so a long instruction
    (an LLM's PG, or one rewritten with the review's fixes) loses its tail, whatever that holds. The
    embedded PG's instructions (14-21 words, ~40 CLIP tokens with the subject line) fit; the random-weight
    bench pipelines, whose tokenizer has one token per character, cut every one. Here the planned mask
    says where the defect goes, so comma clauses that start with a place word go first; then clauses from
    the end, keeping the first one (the defect itself); what is still too long is left to the tokenizer.
    A prompt that fits, or a pipeline without a length-limited tokenizer, is returned unchanged.
    """
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit > 4096 or _token_count(tokenizer, prompt) <= limit:
        return prompt
    head, dot, instruction = prompt.partition(". ")
    prefix = f"{head}." if dot else ""
    clauses = [c.strip() for c in (instruction if dot else prompt).rstrip(". ").split(",") if c.strip()]

    def text(kept: list[str]) -> str:
        return (f"{prefix} " if prefix else "") + ", ".join(kept) + "."

    kept = [c for i, c in enumerate(clauses) if i == 0 or c.split()[0].lower() not in LOCATION_WORDS]
    while len(kept) > 1 and _token_count(tokenizer, text(kept)) > limit:
        kept.pop()
    return text(kept)


@dataclass
class DiffusersInpainter:
    """`ImageGenerator` over a diffusers pipeline; the edit region comes from the procedural planner.

    Args:
        model_path: Local pipeline folder (``diffusion_model_path``).
        kind: ``auto`` (from model_index.json), ``inpaint``, ``flux-fill`` or ``qwen-edit-inpaint``.
        strength: How far the pipeline may move from the init image inside the mask (0..1].
        steps: Denoising steps.
        guidance: Guidance scale, taken the family's way (see `guidance_plan`); None for its usual value.
        resolution: Long side sent to the pipeline; None for the pipeline's native size.
        init: ``sketch`` (the procedural defect, refined by the pipeline) or ``normal``.
        device: ``auto``, ``cpu``, ``cuda``...
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
    """

    model_path: str
    kind: str = "auto"
    strength: float = 0.75
    steps: int = 30
    guidance: float | None = None
    resolution: int | None = None
    init: str = "sketch"
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        self.kind = pipeline_kind(self.model_path, self.kind)
        self.pipe = load_pipeline(self.model_path, self.kind, self.device, self.dtype)
        self.planner = ProceduralEngine()
        self._lock = threading.Lock()  # one pipeline per process, shared by batch worker threads
        self._guidance_mode, default_guidance = guidance_plan(type(self.pipe))
        self._guidance = self.guidance if self.guidance is not None else default_guidance
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        self._multiple = max(16, 2 * scale)
        self._resolution = self.resolution or native_resolution(self.pipe)

    def _prompt(self, request: GenerationRequest, shape: str | None) -> str:
        """`model_prompt`, fitted to the CLIP text encoder that SD and SDXL read it with (FLUX and Qwen
        read it with encoders of longer context, so it goes whole)."""
        text = model_prompt(request, shape)
        return fit_to_text_encoder(text, getattr(self.pipe, "tokenizer", None)) if self.kind == "inpaint" else text

    def generate(self, image: np.ndarray, request: GenerationRequest) -> GenerationResult:
        """Plan the defect, inpaint its window with the pipeline, paste it back (see module docstring)."""
        plan = plan_edit(self.planner, image, request)
        width, height = model_size(plan.window, self._resolution, self._multiple)
        init = plan.sketch if self.init == "sketch" else image
        kwargs: dict[str, Any] = {
            "prompt": self._prompt(request, plan.sketch_result.info.get("shape")),
            "image": to_model(plan.crop(init), (width, height)),
            "mask_image": to_model(plan.crop(plan.edit_mask), (width, height)),
            "height": height,
            "width": width,
            "strength": self.strength,
            "num_inference_steps": self.steps,
            # A CPU generator gives the same noise on every device: a seed means one image.
            "generator": torch.Generator(device="cpu").manual_seed(int(request.seed)),
            "output_type": "pil",
        }
        if self._guidance_mode == "true_cfg":
            kwargs.update(true_cfg_scale=self._guidance, negative_prompt=" ")
        else:
            kwargs["guidance_scale"] = self._guidance
        started = time.perf_counter()
        hint = "lower diffusion_resolution or diffusion_steps, or free the GPU, then batch --resume"
        with self._lock, torch.inference_mode(), out_of_memory_ends_the_run(f"diffusers at {width}x{height}", hint):
            output = self.pipe(**kwargs).images[0]
        seconds = time.perf_counter() - started
        edited = paste_back(image, output, plan)
        info = {
            "engine": "diffusers",
            "pipeline": type(self.pipe).__name__,
            "model": Path(self.model_path).name,
            "model_prompt": kwargs["prompt"],
            "seed": request.seed,
            "init": self.init,
            "strength": self.strength,
            "steps": self.steps,
            "guidance": self._guidance,
            "guidance_mode": self._guidance_mode,
            "model_size": [width, height],
            "seconds": round(seconds, 3),
        }
        return edit_result(image, edited, plan, info)

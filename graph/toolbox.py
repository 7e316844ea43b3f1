"""Tool backends chosen by configuration, built once per process.

Why cached: backends hold loaded models (the embedder, later diffusion pipelines and SAM); a graph
node runs many times per process, and loading per call would dominate the run time. The cache key is
the part of the configuration that decides what gets built.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from graph.configuration import Configuration, ConfigurationError
from tools.image_gen import ProceduralEngine
from tools.knowledge.store import KnowledgeStore
from tools.mask_gen import ChangeMaskGenerator
from tools.prompt_gen import TemplatePromptGenerator
from tools.quality_eval import MetricJudge
from tools.types import ImageGenerator, KnowledgeRetriever, MaskGenerator, PromptGenerator, QualityJudge

if TYPE_CHECKING:
    from tools.llm_client import ChatClient


@dataclass(frozen=True)
class Toolbox:
    """One backend per tool."""

    prompt: PromptGenerator
    image: ImageGenerator
    judge: QualityJudge
    knowledge: KnowledgeRetriever
    mask: MaskGenerator


class Endpoint(NamedTuple):
    """An OpenAI-compatible endpoint for an LLM-backed tool (hashable, so it can key the cache)."""

    base_url: str
    model: str | None
    api_key: str
    timeout_s: float
    max_retries: int

    def client(self, purpose: str) -> ChatClient:
        from tools.llm_client import ChatClient  # the openai client is slow to import; only when used

        return ChatClient(base_url=self.base_url, model=self.model, api_key=self.api_key, timeout_s=self.timeout_s,
                          max_retries=self.max_retries, purpose=purpose)


def tool_endpoint(config: Configuration, tool: str) -> Endpoint:
    """The endpoint of PG-LLM (`tool` "prompt") or QE-VLM ("judge").

    ``<tool>_base_url`` wins; otherwise the policy's ``base_url``. The model is ``<tool>_model``, else
    the policy's model when the tool shares the openai policy's server, else the server's first model.
    """
    own_url = getattr(config, f"{tool}_base_url")
    base_url = own_url or config.base_url
    if not base_url:
        backend = "prompt_backend llm" if tool == "prompt" else "judge_backend vlm"
        raise ConfigurationError(f"{backend} needs an endpoint: set {tool}_base_url (or base_url)")
    model = getattr(config, f"{tool}_model") or (config.model if not own_url and config.policy == "openai" else None)
    return Endpoint(base_url, model, config.api_key, config.request_timeout_s, config.max_retries)


class ImageBackend(NamedTuple):
    """What IG's model backends are built from (hashable: part of the toolbox cache key)."""

    kind: str
    model_path: str | None = None
    pipeline: str = "auto"
    strength: float = 0.75
    steps: int = 30
    guidance: float | None = None
    resolution: int | None = None
    init: str = "sketch"
    device: str = "auto"
    dtype: str = "auto"
    base_url: str | None = None
    model: str | None = None
    api_key: str = "EMPTY"
    size: int = 1024
    timeout_s: float = 60.0
    max_retries: int = 2
    edit_sizes: str = "1024x1024,1536x1024,1024x1536"
    response_format: str | None = None


class MaskBackend(NamedTuple):
    """What MG's SAM backend is built from (hashable: part of the toolbox cache key)."""

    checkpoint: str
    model_type: str = "auto"
    device: str = "auto"


def image_backend(config: Configuration) -> ImageBackend | None:
    """IG's model backend settings, or None for the procedural engine.

    Raises:
        ConfigurationError: When the backend's model path or endpoint is not set.
    """
    if config.image_backend == "procedural":
        return None
    if config.image_backend == "diffusers" and not config.diffusion_model_path:
        raise ConfigurationError("image_backend diffusers needs diffusion_model_path: a local diffusers pipeline folder")
    if config.image_backend == "endpoint" and not config.image_edit_base_url:
        raise ConfigurationError("image_backend endpoint needs image_edit_base_url: an OpenAI-compatible /images/edits endpoint")
    return ImageBackend(
        config.image_backend, config.diffusion_model_path, config.diffusion_pipeline, config.diffusion_strength,
        config.diffusion_steps, config.diffusion_guidance, config.diffusion_resolution, config.edit_init,
        config.torch_device, config.torch_dtype, config.image_edit_base_url, config.image_edit_model, config.api_key,
        config.image_edit_size, config.request_timeout_s, config.max_retries, config.image_edit_sizes,
        config.image_edit_response_format,
    )


def mask_backend(config: Configuration) -> MaskBackend | None:
    """MG's SAM settings, or None for the change mask.

    Raises:
        ConfigurationError: When mask_backend is sam and no checkpoint is set.
    """
    if config.mask_backend == "change":
        return None
    if not config.sam_checkpoint:
        raise ConfigurationError("mask_backend sam needs sam_checkpoint: the local path of a SAM checkpoint (.pth)")
    return MaskBackend(config.sam_checkpoint, config.sam_model_type, config.torch_device)


#: Backends that replace the configured ones in this context (`tools_replaced`).
_REPLACED: ContextVar[dict[str, Any]] = ContextVar("replaced_tools", default={})


@contextmanager
def tools_replaced(**backends: Any) -> Iterator[None]:
    """Within the block, `get_toolbox` returns these backends (by `Toolbox` field) instead of the configured ones.

    Why a context variable: the replacement belongs to the graph runs started in the block (LangGraph runs
    their nodes in copies of this context), never to other runs of the process that share the cache.
    """
    token = _REPLACED.set({**_REPLACED.get(), **backends})
    try:
        yield
    finally:
        _REPLACED.reset(token)


def get_toolbox(config: Configuration) -> Toolbox:
    """The toolbox for `config`, shared by every run in this process with the same backend settings."""
    toolbox = _configured_toolbox(config)
    replaced = _REPLACED.get()
    return replace(toolbox, **replaced) if replaced else toolbox


def _configured_toolbox(config: Configuration) -> Toolbox:
    return _build(
        config.prompt_backend,
        config.image_backend,
        config.judge_backend,
        config.knowledge_backend,
        config.mask_backend,
        config.pass_location,
        config.pass_quality,
        config.kb_path,
        tool_endpoint(config, "prompt") if config.prompt_backend == "llm" else None,
        tool_endpoint(config, "judge") if config.judge_backend == "vlm" else None,
        config.prompt_temperature,
        config.judge_attempts,
        image_backend(config),
        mask_backend(config),
    )


@lru_cache(maxsize=8)
def _build(
    prompt_backend: str,
    image_backend: str,
    judge_backend: str,
    knowledge_backend: str,
    mask_backend: str,
    pass_location: float,
    pass_quality: float,
    kb_path: str | None,
    prompt_endpoint: Endpoint | None = None,
    judge_endpoint: Endpoint | None = None,
    prompt_temperature: float = 0.7,
    judge_attempts: int = 2,
    image_spec: ImageBackend | None = None,
    mask_spec: MaskBackend | None = None,
) -> Toolbox:
    # The Literal types in Configuration reject unknown backend names; the specs carry the chosen ones.
    del image_backend, knowledge_backend, mask_backend
    prompt: PromptGenerator = TemplatePromptGenerator()
    if prompt_backend == "llm" and prompt_endpoint is not None:
        from tools.prompt_gen_llm import LLMPromptGenerator

        prompt = LLMPromptGenerator(prompt_endpoint.client("PG"), temperature=prompt_temperature)
    judge: QualityJudge = MetricJudge(pass_location=pass_location, pass_quality=pass_quality)
    if judge_backend == "vlm" and judge_endpoint is not None:
        from tools.quality_eval_vlm import VLMJudge

        judge = VLMJudge(judge_endpoint.client("judge"), pass_location=pass_location, pass_quality=pass_quality,
                         attempts=judge_attempts)
    return Toolbox(
        prompt=prompt,
        image=_image_generator(image_spec),
        judge=judge,
        knowledge=KnowledgeStore(kb_path),
        mask=_mask_generator(mask_spec),
    )


def _image_generator(spec: ImageBackend | None) -> ImageGenerator:
    """IG's backend; model errors (missing folder, unloadable pipeline) become one-line ConfigurationErrors."""
    if spec is None:
        return ProceduralEngine()
    if spec.kind == "endpoint":
        from tools.image_gen_endpoint import EndpointImageEditor, parse_sizes

        try:
            sizes = parse_sizes(spec.edit_sizes)
        except ValueError as error:
            raise ConfigurationError(f"image_edit_sizes: {error}") from None
        return EndpointImageEditor(base_url=spec.base_url or "", model=spec.model, api_key=spec.api_key, size=spec.size,
                                   init=spec.init, timeout_s=spec.timeout_s, max_retries=spec.max_retries, sizes=sizes,
                                   response_format=spec.response_format)
    from tools.image_gen_diffusers import DiffusersInpainter, DiffusersModelError

    try:
        return DiffusersInpainter(model_path=spec.model_path or "", kind=spec.pipeline, strength=spec.strength,
                                  steps=spec.steps, guidance=spec.guidance, resolution=spec.resolution, init=spec.init,
                                  device=spec.device, dtype=spec.dtype)
    except DiffusersModelError as error:
        raise ConfigurationError(str(error)) from None


def _mask_generator(spec: MaskBackend | None) -> MaskGenerator:
    """MG's backend; a missing or wrong SAM checkpoint becomes a one-line ConfigurationError."""
    if spec is None:
        return ChangeMaskGenerator()
    from tools.mask_gen_sam import SamCheckpointError, SamMaskGenerator

    try:
        return SamMaskGenerator(spec.checkpoint, spec.model_type, spec.device)
    except SamCheckpointError as error:
        raise ConfigurationError(str(error)) from None


def check_toolbox(config: Configuration) -> None:
    """Check the tool backends' settings and local files before any run, without loading a model.

    Why: a batch should stop at once on a wrong path, not after its first sample reaches image_gen.

    Raises:
        ConfigurationError: one line naming the setting to fix.
    """
    image_spec, mask_spec = image_backend(config), mask_backend(config)
    if image_spec is not None and image_spec.kind == "diffusers":
        from tools.image_gen_diffusers import DiffusersModelError, pipeline_kind

        try:
            pipeline_kind(image_spec.model_path or "", image_spec.pipeline)
        except DiffusersModelError as error:
            raise ConfigurationError(str(error)) from None
    if mask_spec is not None and not Path(mask_spec.checkpoint).expanduser().is_file():
        raise ConfigurationError(f"sam_checkpoint {mask_spec.checkpoint} does not exist; set it to a local SAM checkpoint (.pth)")

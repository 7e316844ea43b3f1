"""Tool backends chosen by configuration, built once per process.

Why cached: backends hold loaded models (the embedder, later diffusion pipelines and SAM); a graph
node runs many times per process, and loading per call would dominate the run time. The cache key is
the part of the configuration that decides what gets built: the tool sections themselves (`ToolSettings`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from graph.configuration import (
    Configuration,
    ConfigurationError,
    ConnectionSettings,
    ImageSettings,
    JudgeSettings,
    KnowledgeSettings,
    MaskSettings,
    PromptSettings,
)
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

    The tool's own ``base_url`` wins; otherwise the policy's. The model is the tool's own, else the
    policy's model when the tool shares the openai policy's server, else the server's first model.
    """
    section: PromptSettings | JudgeSettings = config.prompt if tool == "prompt" else config.judge
    base_url = section.base_url or config.policy.base_url
    if not base_url:
        backend = "prompt_backend llm" if tool == "prompt" else "judge_backend vlm"
        raise ConfigurationError(f"{backend} needs an endpoint: set {tool}_base_url (or base_url)")
    model = section.model or (config.policy.model if not section.base_url and config.policy.kind == "openai" else None)
    return Endpoint(base_url, model, config.connection.api_key, config.connection.timeout_s, config.connection.max_retries)


class ToolSettings(NamedTuple):
    """What the toolbox is built from: the tool sections, the endpoints the LLM tools resolve to, the device.

    Hashable (frozen sections), so it keys the toolbox cache: the policy's own settings (its temperature,
    say) are not part of it, so changing them never reloads a tool's model.
    """

    prompt: PromptSettings
    image: ImageSettings
    judge: JudgeSettings
    knowledge: KnowledgeSettings
    mask: MaskSettings
    connection: ConnectionSettings
    device: str
    prompt_endpoint: Endpoint | None
    judge_endpoint: Endpoint | None


def tool_settings(config: Configuration) -> ToolSettings:
    """The part of `config` that decides what the toolbox holds.

    Raises:
        ConfigurationError: When an LLM tool has no endpoint, or a model backend no model path or endpoint.
    """
    prompt_endpoint = tool_endpoint(config, "prompt") if config.prompt.backend == "llm" else None
    judge_endpoint = tool_endpoint(config, "judge") if config.judge.backend == "vlm" else None
    _check_model_settings(config)
    return ToolSettings(config.prompt, config.image, config.judge, config.knowledge, config.mask, config.connection,
                        config.device, prompt_endpoint, judge_endpoint)


def _check_model_settings(config: Configuration) -> None:
    """Raise a `ConfigurationError` naming the setting when a model backend has no model path or endpoint."""
    image, mask = config.image, config.mask
    if image.backend == "diffusers" and not image.model_path:
        raise ConfigurationError("image_backend diffusers needs diffusion_model_path: a local diffusers pipeline folder")
    if image.backend == "endpoint" and not image.base_url:
        raise ConfigurationError("image_backend endpoint needs image_edit_base_url: an OpenAI-compatible /images/edits endpoint")
    if mask.backend == "sam" and not mask.checkpoint:
        raise ConfigurationError("mask_backend sam needs sam_checkpoint: the local path of a SAM checkpoint (.pth)")


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
    toolbox = _build(tool_settings(config))
    replaced = _REPLACED.get()
    return replace(toolbox, **replaced) if replaced else toolbox


@lru_cache(maxsize=8)
def _build(settings: ToolSettings) -> Toolbox:
    prompt: PromptGenerator = TemplatePromptGenerator()
    if settings.prompt_endpoint is not None:
        from tools.prompt_gen_llm import LLMPromptGenerator

        prompt = LLMPromptGenerator(settings.prompt_endpoint.client("PG"), temperature=settings.prompt.temperature)
    judge_settings = settings.judge
    judge: QualityJudge = MetricJudge(pass_location=judge_settings.pass_location, pass_quality=judge_settings.pass_quality)
    if settings.judge_endpoint is not None:
        from tools.quality_eval_vlm import VLMJudge

        judge = VLMJudge(settings.judge_endpoint.client("judge"), pass_location=judge_settings.pass_location,
                         pass_quality=judge_settings.pass_quality, attempts=judge_settings.attempts)
    return Toolbox(
        prompt=prompt,
        image=_image_generator(settings.image, settings.connection, settings.device),
        judge=judge,
        knowledge=KnowledgeStore(settings.knowledge.path),
        mask=_mask_generator(settings.mask, settings.device),
    )


def _image_generator(image: ImageSettings, connection: ConnectionSettings, device: str) -> ImageGenerator:
    """IG's backend; model errors (missing folder, unloadable pipeline) become one-line ConfigurationErrors."""
    if image.backend == "procedural":
        return ProceduralEngine()
    if image.backend == "endpoint":
        from tools.image_gen_endpoint import EndpointImageEditor, parse_sizes

        try:
            sizes = parse_sizes(image.sizes)
        except ValueError as error:
            raise ConfigurationError(f"image_edit_sizes: {error}") from None
        return EndpointImageEditor(base_url=image.base_url or "", model=image.model, api_key=connection.api_key,
                                   size=image.size, init=image.init, timeout_s=connection.timeout_s,
                                   max_retries=connection.max_retries, sizes=sizes, response_format=image.response_format)
    from tools.image_gen_diffusers import DiffusersInpainter, DiffusersModelError

    try:
        return DiffusersInpainter(model_path=image.model_path or "", kind=image.pipeline, strength=image.strength,
                                  steps=image.steps, guidance=image.guidance, resolution=image.resolution, init=image.init,
                                  device=device, dtype=image.dtype)
    except DiffusersModelError as error:
        raise ConfigurationError(str(error)) from None


def _mask_generator(mask: MaskSettings, device: str) -> MaskGenerator:
    """MG's backend; a missing or wrong SAM checkpoint becomes a one-line ConfigurationError."""
    if mask.backend == "change":
        return ChangeMaskGenerator()
    from tools.mask_gen_sam import SamCheckpointError, SamMaskGenerator

    try:
        return SamMaskGenerator(mask.checkpoint or "", mask.model_type, device)
    except SamCheckpointError as error:
        raise ConfigurationError(str(error)) from None


def check_toolbox(config: Configuration) -> None:
    """Check the tool backends' settings and local files before any run, without loading a model.

    Why: a batch should stop at once on a wrong path, not after its first sample reaches image_gen.

    Raises:
        ConfigurationError: one line naming the setting to fix.
    """
    _check_model_settings(config)
    image, mask = config.image, config.mask
    if image.backend == "diffusers":
        from tools.image_gen_diffusers import DiffusersModelError, pipeline_kind

        try:
            pipeline_kind(image.model_path or "", image.pipeline)
        except DiffusersModelError as error:
            raise ConfigurationError(str(error)) from None
    if mask.backend == "sam" and not Path(mask.checkpoint or "").expanduser().is_file():
        raise ConfigurationError(f"sam_checkpoint {mask.checkpoint} does not exist; set it to a local SAM checkpoint (.pth)")

"""One `Configuration` for a run, read from defaults, a YAML file, the environment and `configurable`.

Why layered: the same graph runs from the CLI (flags and `--config FILE`), from Python, and under
`langgraph dev` / Studio, where the only channel is the run's `configurable` section. Later layers win:
defaults < YAML file < environment (``ANOMALY_AGENT_<FIELD>``) < ``configurable``. pydantic validates
the merged result, so a typo fails at the start of a run with the field's name, not mid-way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "ANOMALY_AGENT_"
CONFIG_FILE_ENV = "ANOMALY_AGENT_CONFIG"


class ConfigurationError(ValueError):
    """A configuration value is missing, unknown or invalid."""


class Configuration(BaseModel):
    """Everything a run can be configured with; every field can come from any layer."""

    model_config = ConfigDict(extra="forbid")

    # Policy
    policy: Literal["scripted", "openai", "local"] = "scripted"
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint for the openai policy.")
    model: str | None = Field(default=None, description="Model name (openai) or local folder (local).")
    api_key: str = "EMPTY"
    temperature: float = Field(default=0.0, ge=0, le=2, description="Policy sampling temperature; 0 is greedy.")
    max_tokens: int = Field(default=256, ge=1, le=32768, description="Most tokens the policy may write per turn.")
    request_timeout_s: float = Field(default=60.0, gt=0, description="Per-request timeout for model endpoints.")
    max_retries: int = Field(default=2, ge=0, le=10, description="Extra tries on connection errors, timeouts, 5xx.")
    vision: bool = Field(default=False, description="The policy is a VLM: send it the normal image as a data URL.")
    show_generated_images: bool = Field(default=False, description="With vision: also send each generated image.")
    stop_after_tool_call: bool = Field(
        default=True, description="Stop generating at '</tool_call>': one call per turn, no tokens wasted after it."
    )
    record_token_ids: bool = Field(
        default=False, description="Keep the policy's generated token ids and logprobs in each message (GRPO)."
    )

    # Budget (DESIGN §3)
    max_steps: int = Field(default=10, ge=1, le=100)
    max_image_gens: int = Field(default=3, ge=1, le=20)

    # Tool backends
    prompt_backend: Literal["template", "llm"] = "template"
    image_backend: Literal["procedural", "diffusers", "endpoint"] = "procedural"
    judge_backend: Literal["metric", "vlm"] = "metric"
    knowledge_backend: Literal["chroma"] = "chroma"
    mask_backend: Literal["change", "sam"] = "change"
    pass_location: float = Field(default=3.0, ge=0, le=5, description="QE location score needed to pass.")
    pass_quality: float = Field(default=3.0, ge=0, le=5, description="QE quality score needed to pass.")
    prompt_base_url: str | None = Field(default=None, description="Endpoint for prompt_backend llm; default: base_url.")
    prompt_model: str | None = Field(default=None, description="Model for prompt_backend llm; default: the server's.")
    prompt_temperature: float = Field(default=0.7, ge=0, le=2, description="PG-LLM temperature (varied instructions).")
    judge_base_url: str | None = Field(default=None, description="Endpoint for judge_backend vlm; default: base_url.")
    judge_model: str | None = Field(default=None, description="Model for judge_backend vlm; default: the server's.")
    judge_attempts: int = Field(default=2, ge=1, le=10, description="VLM tries for a valid verdict before the metric fallback.")

    # Production image backends (DESIGN §4): IG diffusers/endpoint, MG sam. Model files come from local paths only.
    diffusion_model_path: str | None = Field(default=None, description="Local diffusers pipeline folder (image_backend diffusers).")
    diffusion_pipeline: Literal["auto", "inpaint", "flux-fill", "qwen-edit-inpaint"] = Field(
        default="auto", description="Pipeline family; auto reads the folder's model_index.json."
    )
    diffusion_strength: float = Field(default=0.75, gt=0, le=1, description="How far the pipeline may move from the init image.")
    diffusion_steps: int = Field(default=30, ge=1, le=500, description="Denoising steps per edit.")
    diffusion_guidance: float | None = Field(default=None, ge=0, description="Guidance (true CFG for Qwen); default per family.")
    diffusion_resolution: int | None = Field(default=None, ge=32, le=4096, description="Long side sent to the model; default native.")
    edit_init: Literal["sketch", "normal"] = Field(
        default="sketch", description="Init image of model backends: the procedural sketch of the defect, or the normal image."
    )
    torch_device: str = Field(default="auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:1...")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Diffusion dtype; auto is bfloat16 on CUDA, float32 on the CPU."
    )
    image_edit_base_url: str | None = Field(default=None, description="OpenAI-compatible /images/edits endpoint (image_backend endpoint).")
    image_edit_model: str | None = Field(default=None, description="Model name for the image-edit endpoint.")
    image_edit_size: int = Field(default=1024, ge=64, le=4096, description="Long side of the window sent to the endpoint (image_edit_sizes any).")
    image_edit_sizes: str = Field(
        default="1024x1024,1536x1024,1024x1536",
        description="Sizes the endpoint accepts (WxH, comma-separated; default: GPT image models'), the window is sent at "
                    "the one nearest its aspect; 'any' sends the window's own aspect at image_edit_size.",
    )
    image_edit_response_format: Literal["b64_json", "url"] | None = Field(
        default=None, description="Sent only when set (GPT image models refuse the parameter; DALL-E 2 defaults to url)."
    )
    sam_checkpoint: str | None = Field(default=None, description="Local SAM checkpoint (mask_backend sam).")
    sam_model_type: Literal["auto", "vit_b", "vit_l", "vit_h"] = Field(
        default="auto", description="Checked against the checkpoint; auto accepts what it holds."
    )

    # Storage
    run_root: str = Field(default="runs", description="Where runs without an explicit run_dir write.")
    kb_path: str | None = Field(default=None, description="chromadb folder; default: the user cache.")
    return_data_urls: bool = False
    seed: int = 0

    @classmethod
    def load(cls, *, config_file: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> "Configuration":
        """Merge the layers (see module docstring) and validate.

        Args:
            config_file: A YAML file; if None, ``$ANOMALY_AGENT_CONFIG`` or ``configurable['config_file']``.
            overrides: The highest layer (``configurable`` or CLI flags); None values are skipped.

        Returns:
            The validated configuration.
        """
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        config_file = config_file or overrides.pop("config_file", None) or os.environ.get(CONFIG_FILE_ENV)
        overrides.pop("config_file", None)
        merged: dict[str, Any] = {}
        if config_file:
            merged.update(_read_yaml(preset_path(config_file)))
        merged.update(_read_env())
        merged.update({k: v for k, v in overrides.items() if k in cls.model_fields})
        try:
            return cls(**merged)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "configuration"
            raise ConfigurationError(f"invalid configuration '{where}': {first['msg']}") from None

    @classmethod
    def from_runnable_config(cls, config: RunnableConfig | None = None) -> "Configuration":
        """The configuration of a graph run, from its ``configurable`` section and the lower layers."""
        configurable = dict((config or {}).get("configurable") or {})
        known = {k: v for k, v in configurable.items() if k in cls.model_fields or k == "config_file"}
        return cls.load(overrides=known)


#: Named configurations shipped with the package (``--config gpu-open``): graph/presets/<name>.yaml.
PRESET_DIR = Path(__file__).parent / "presets"


def preset_path(config_file: str | os.PathLike) -> Path:
    """`config_file` itself, or the shipped preset of that name when no such file exists."""
    path = Path(config_file).expanduser()
    preset = PRESET_DIR / f"{config_file}.yaml"
    if not path.is_file() and preset.is_file():
        return preset
    return path


def presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigurationError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigurationError(f"config file {path} is not valid YAML: {error}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"config file {path} must hold a mapping of keys to values")
    unknown = sorted(set(data) - set(Configuration.model_fields))
    if unknown:
        raise ConfigurationError(f"config file {path} has unknown keys: {', '.join(unknown)}")
    return data


def _read_env() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in Configuration.model_fields:
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = yaml.safe_load(raw) if raw.strip() else None
    return values

"""One `Configuration` for a run, read from defaults, a YAML file, the environment and the run's settings.

The configuration is a tree of frozen sections (policy, connection, budget, one per tool backend,
storage); every setting also has a flat name (`FLAT_NAMES`: ``max_steps``, ``diffusion_model_path``)
that every layer accepts, so YAML files, ``ANOMALY_AGENT_*`` variables and run settings stay flat.

Why layered: the same graph runs from the CLI (flags and `--config FILE`), from Python, and under
`langgraph dev` / Studio, where the only channel is the run's context (LangGraph 1.x `context_schema`,
`RunSettings` here) or, for older callers, its `configurable` section. Later layers win:
defaults < YAML file < environment (``ANOMALY_AGENT_<FIELD>``) < ``configurable`` < context. pydantic
validates the merged result once per run (`run_configuration`), so a typo fails at the start of a run
with the field's name and the closest known one, not mid-way.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

ENV_PREFIX = "ANOMALY_AGENT_"
CONFIG_FILE_ENV = "ANOMALY_AGENT_CONFIG"


class ConfigurationError(ValueError):
    """A configuration value is missing, unknown or invalid."""


class _KnownNames(BaseModel):
    """Settings that refuse unknown names with the closest known one (pydantic's own message names only the key)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in data if k not in cls.model_fields)
            if unknown:
                raise ValueError(unknown_setting_message(unknown[0], cls.model_fields))
        return data


class Section(_KnownNames):
    """A frozen group of settings: hashable, so a section can key a cache of what is built from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicySettings(Section):
    """Who decides the next tool call, and how it samples."""

    kind: Literal["scripted", "openai", "local"] = Field(
        default="scripted", description="Who decides the next tool call: scripted (expert protocol), openai (endpoint), local (model folder)."
    )
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint for the openai policy.")
    model: str | None = Field(default=None, description="Model name (openai) or local folder (local).")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Policy sampling temperature; 0 is greedy.")
    max_tokens: int = Field(default=256, ge=1, le=32768, description="Most tokens the policy may write per turn.")
    vision: bool = Field(default=False, description="The policy is a VLM: send it the normal image as a data URL.")
    show_generated_images: bool = Field(default=False, description="With vision: also send each generated image.")
    stop_after_tool_call: bool = Field(
        default=True, description="Stop generating at '</tool_call>': one call per turn, no tokens wasted after it."
    )
    record_token_ids: bool = Field(
        default=False, description="Keep the policy's generated token ids and logprobs in each message (GRPO)."
    )


class ConnectionSettings(Section):
    """How every model endpoint is called (the policy's, PG-LLM's, QE-VLM's, IG's image-edit endpoint)."""

    api_key: str = Field(default="EMPTY", description="API key sent to the openai policy's endpoint.")
    timeout_s: float = Field(default=60.0, gt=0, description="Per-request timeout for model endpoints.")
    max_retries: int = Field(default=2, ge=0, le=10, description="Extra tries on connection errors, timeouts, 5xx.")


class BudgetSettings(Section):
    """What a run may spend (DESIGN §3)."""

    max_steps: int = Field(default=10, ge=1, le=100, description="Most tool calls in a run; then it ends with the best image.")
    max_image_gens: int = Field(default=3, ge=1, le=20, description="Most image_gen calls in a run.")


class PromptSettings(Section):
    """PG's backend."""

    backend: Literal["template", "llm"] = Field(default="template", description="PG: templates, or an LLM endpoint.")
    base_url: str | None = Field(default=None, description="Endpoint for prompt_backend llm; default: base_url.")
    model: str | None = Field(default=None, description="Model for prompt_backend llm; default: the server's.")
    temperature: float = Field(default=0.7, ge=0, le=2, description="PG-LLM temperature (varied instructions).")


class ImageSettings(Section):
    """IG's backend (DESIGN §4): the procedural engine, a local diffusers pipeline, or an image-edit endpoint.

    Model files come from local paths only.
    """

    backend: Literal["procedural", "diffusers", "endpoint"] = Field(
        default="procedural", description="IG: procedural (CPU), a local diffusers pipeline, or an image-edit endpoint."
    )
    model_path: str | None = Field(default=None, description="Local diffusers pipeline folder (image_backend diffusers).")
    pipeline: Literal["auto", "inpaint", "flux-fill", "qwen-edit-inpaint"] = Field(
        default="auto", description="Pipeline family; auto reads the folder's model_index.json."
    )
    strength: float = Field(default=0.75, gt=0, le=1, description="How far the pipeline may move from the init image.")
    steps: int = Field(default=30, ge=1, le=500, description="Denoising steps per edit.")
    guidance: float | None = Field(default=None, ge=0, description="Guidance (true CFG for Qwen); default per family.")
    resolution: int | None = Field(default=None, ge=32, le=4096, description="Long side sent to the model; default native.")
    init: Literal["sketch", "normal"] = Field(
        default="sketch", description="Init image of model backends: the procedural sketch of the defect, or the normal image."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Diffusion dtype; auto is bfloat16 on CUDA, float32 on the CPU."
    )
    base_url: str | None = Field(default=None, description="OpenAI-compatible /images/edits endpoint (image_backend endpoint).")
    model: str | None = Field(default=None, description="Model name for the image-edit endpoint.")
    size: int = Field(default=1024, ge=64, le=4096, description="Long side of the window sent to the endpoint (image_edit_sizes any).")
    sizes: str = Field(
        default="1024x1024,1536x1024,1024x1536",
        description="Sizes the endpoint accepts (WxH, comma-separated; default: GPT image models'), the window is sent at "
                    "the one nearest its aspect; 'any' sends the window's own aspect at image_edit_size.",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        default=None, description="Sent only when set (GPT image models refuse the parameter; DALL-E 2 defaults to url)."
    )


class JudgeSettings(Section):
    """QE's backend and its pass thresholds."""

    backend: Literal["metric", "vlm"] = Field(default="metric", description="QE: image metrics, or a VLM endpoint.")
    pass_location: float = Field(default=3.0, ge=0, le=5, description="QE location score needed to pass.")
    pass_quality: float = Field(default=3.0, ge=0, le=5, description="QE quality score needed to pass.")
    base_url: str | None = Field(default=None, description="Endpoint for judge_backend vlm; default: base_url.")
    model: str | None = Field(default=None, description="Model for judge_backend vlm; default: the server's.")
    attempts: int = Field(default=2, ge=1, le=10, description="VLM tries for a valid verdict before the metric fallback.")


class KnowledgeSettings(Section):
    """KR's backend."""

    backend: Literal["chroma"] = Field(default="chroma", description="KR: the chromadb knowledge base.")
    path: str | None = Field(
        default=None, description="chromadb folder; default: the user cache. Set by whoever runs the server, not by a run."
    )


class MaskSettings(Section):
    """MG's backend."""

    backend: Literal["change", "sam"] = Field(default="change", description="MG: change mask, or a local SAM checkpoint.")
    checkpoint: str | None = Field(default=None, description="Local SAM checkpoint (mask_backend sam).")
    model_type: Literal["auto", "vit_b", "vit_l", "vit_h"] = Field(
        default="auto", description="Checked against the checkpoint; auto accepts what it holds."
    )


class StorageSettings(Section):
    """Where a run writes and what its result carries."""

    run_root: str = Field(
        default="runs",
        description="Folder every served run writes under (relative: to the working directory); a served run's run_dir "
        "is a path inside it. Set by whoever runs the server (YAML file or $ANOMALY_AGENT_RUN_ROOT), not by a run.",
    )
    input_root: str | None = Field(
        default=None,
        description="Folder a run's image file must lie in (after symlinks; a relative image path is taken inside it). "
        "Served runs: 'inputs' (relative to the working directory) when unset; in-process runs: any path unless set. "
        "Set by whoever runs the server, not by a run.",
    )
    return_data_urls: bool = Field(default=False, description="Also return the anomaly image and mask as PNG data URLs.")


#: Every setting's flat name (YAML keys, ``ANOMALY_AGENT_<NAME>``, ``configurable``, the context, CLI flags)
#: and where it lives: (section, field), or (None, field) for a field of `Configuration` itself.
FLAT_NAMES: dict[str, tuple[str | None, str]] = {
    "policy": ("policy", "kind"),
    "base_url": ("policy", "base_url"),
    "model": ("policy", "model"),
    "api_key": ("connection", "api_key"),
    "temperature": ("policy", "temperature"),
    "max_tokens": ("policy", "max_tokens"),
    "request_timeout_s": ("connection", "timeout_s"),
    "max_retries": ("connection", "max_retries"),
    "vision": ("policy", "vision"),
    "show_generated_images": ("policy", "show_generated_images"),
    "stop_after_tool_call": ("policy", "stop_after_tool_call"),
    "record_token_ids": ("policy", "record_token_ids"),
    "max_steps": ("budget", "max_steps"),
    "max_image_gens": ("budget", "max_image_gens"),
    "prompt_backend": ("prompt", "backend"),
    "image_backend": ("image", "backend"),
    "judge_backend": ("judge", "backend"),
    "knowledge_backend": ("knowledge", "backend"),
    "mask_backend": ("mask", "backend"),
    "pass_location": ("judge", "pass_location"),
    "pass_quality": ("judge", "pass_quality"),
    "prompt_base_url": ("prompt", "base_url"),
    "prompt_model": ("prompt", "model"),
    "prompt_temperature": ("prompt", "temperature"),
    "judge_base_url": ("judge", "base_url"),
    "judge_model": ("judge", "model"),
    "judge_attempts": ("judge", "attempts"),
    "diffusion_model_path": ("image", "model_path"),
    "diffusion_pipeline": ("image", "pipeline"),
    "diffusion_strength": ("image", "strength"),
    "diffusion_steps": ("image", "steps"),
    "diffusion_guidance": ("image", "guidance"),
    "diffusion_resolution": ("image", "resolution"),
    "edit_init": ("image", "init"),
    "torch_device": (None, "device"),
    "torch_dtype": ("image", "dtype"),
    "image_edit_base_url": ("image", "base_url"),
    "image_edit_model": ("image", "model"),
    "image_edit_size": ("image", "size"),
    "image_edit_sizes": ("image", "sizes"),
    "image_edit_response_format": ("image", "response_format"),
    "sam_checkpoint": ("mask", "checkpoint"),
    "sam_model_type": ("mask", "model_type"),
    "run_root": ("storage", "run_root"),
    "input_root": ("storage", "input_root"),
    "kb_path": ("knowledge", "path"),
    "return_data_urls": ("storage", "return_data_urls"),
    "seed": (None, "seed"),
}
_FLAT_NAME_OF = {where: flat for flat, where in FLAT_NAMES.items()}


class Configuration(Section):
    """Everything a run can be configured with, in frozen sections; every setting can come from any layer.

    Built from flat names (``Configuration(max_steps=3)``, the layers' keys, see `FLAT_NAMES`), from
    sections (``Configuration(budget={"max_steps": 3})``), or both; a flat name wins over its section's
    field. Frozen and hashable: a section keys the caches of what is built from it (`graph.toolbox`).
    """

    policy: PolicySettings = Field(default_factory=PolicySettings, description=PolicySettings.__doc__)
    connection: ConnectionSettings = Field(default_factory=ConnectionSettings, description=ConnectionSettings.__doc__)
    budget: BudgetSettings = Field(default_factory=BudgetSettings, description=BudgetSettings.__doc__)
    prompt: PromptSettings = Field(default_factory=PromptSettings, description=PromptSettings.__doc__)
    image: ImageSettings = Field(default_factory=ImageSettings, description="IG's backend.")
    judge: JudgeSettings = Field(default_factory=JudgeSettings, description=JudgeSettings.__doc__)
    knowledge: KnowledgeSettings = Field(default_factory=KnowledgeSettings, description=KnowledgeSettings.__doc__)
    mask: MaskSettings = Field(default_factory=MaskSettings, description=MaskSettings.__doc__)
    storage: StorageSettings = Field(default_factory=StorageSettings, description=StorageSettings.__doc__)
    device: str = Field(default="auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:1...")
    seed: int = Field(default=0, description="Seed of a run whose input gives none; the same seed repeats a run.")

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_names(cls, data: Any) -> Any:
        """Nest flat names into their sections; refuse unknown names with the closest flat one."""
        if not isinstance(data, dict):
            return data
        nested: dict[str, Any] = {}
        flat: list[tuple[str, Any]] = []
        for key, value in data.items():
            if key in cls.model_fields and (key not in FLAT_NAMES or isinstance(value, (dict, BaseModel))):
                nested[key] = dict(value) if isinstance(value, BaseModel) else value
            elif key in FLAT_NAMES:
                flat.append((key, value))
        unknown = sorted(str(k) for k in data if k not in cls.model_fields and k not in FLAT_NAMES)
        if unknown:
            raise ValueError(unknown_setting_message(unknown[0], FLAT_NAMES))
        for key, value in flat:
            section, name = FLAT_NAMES[key]
            if section is None:
                nested[name] = value
            else:
                nested[section] = {**(nested.get(section) or {}), name: value}
        return nested

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name (`FLAT_NAMES`)."""
        return {flat: getattr(self if section is None else getattr(self, section), name)
                for flat, (section, name) in FLAT_NAMES.items()}

    @classmethod
    def load(cls, *, config_file: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> "Configuration":
        """Merge the layers (see module docstring) and validate.

        Args:
            config_file: A YAML file; if None, ``$ANOMALY_AGENT_CONFIG`` or ``configurable['config_file']``.
            overrides: The highest layer (``configurable`` or CLI flags), by flat name; None values are skipped.

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
        merged.update({k: v for k, v in overrides.items() if k in FLAT_NAMES})
        try:
            return cls(**merged)
        except ValidationError as error:
            raise ConfigurationError(validation_message(error)) from None

    @classmethod
    def from_runnable_config(cls, config: RunnableConfig | None = None) -> "Configuration":
        """The configuration of a graph run, from its ``configurable`` section and the lower layers."""
        return run_configuration(config)


def _flat_field(section: str | None, name: str) -> tuple[Any, Any]:
    owner = Configuration if section is None else Configuration.model_fields[section].annotation
    info = owner.model_fields[name]  # type: ignore[union-attr]
    return info.annotation, copy.copy(info)


#: The graph's ``context_schema``: every setting by its flat name, so LangGraph Studio shows one form of
#: described fields and a run's context stays the flat mapping it always was.
RunSettings: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "RunSettings",
    __base__=_KnownNames,
    __doc__="A run's settings (the graph's ``context_schema``): any `Configuration` field, plus a preset or YAML "
            "file.\n\nOnly the fields a caller sets count (``model_fields_set``); the rest come from the lower layers.",
    **{flat: _flat_field(*where) for flat, where in FLAT_NAMES.items()},
    config_file=(str | None, Field(
        default=None, description="A shipped preset (e.g. gpu-open) or YAML file: a layer below these settings."
    )),
)


#: Per-run settings a served run may not change: they name folders on the server (DESIGN §3).
DEPLOYMENT_SETTINGS = ("run_root", "kb_path", "input_root")


def unknown_setting_message(name: str, known: Any) -> str:
    """``unknown setting 'max_step' (did you mean 'max_steps'?)``: one line naming the closest known name."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"unknown setting '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")


def validation_message(error: ValidationError) -> str:
    """One line naming the field of pydantic's first complaint."""
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if tuple(loc[:2]) in _FLAT_NAME_OF:  # (section, field): the setting's flat name
        loc[:2] = [_FLAT_NAME_OF[(loc[0], loc[1])]]
    elif loc and (None, loc[0]) in _FLAT_NAME_OF:
        loc[0] = _FLAT_NAME_OF[(None, loc[0])]
    where = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid configuration '{where}': {message}" if where else f"invalid configuration: {message}"


def run_configuration(config: RunnableConfig | None = None, context: Any = None, *, served: bool = False) -> Configuration:
    """The validated configuration of a graph run: the lower layers, then ``configurable``, then the context.

    Why strict about names: ``configurable`` is shared with LangGraph (thread_id, checkpoint ids), so an
    unknown key there is refused only when it is close to a setting (a typo like ``max_step``); the
    context belongs to this graph alone, so any unknown name there is refused. A served run (`served`)
    may name a shipped preset, not a file, and may not set `DEPLOYMENT_SETTINGS`.

    The result is cached on its inputs (file contents by modification time, environment, settings), so the
    layers are read and validated once per run rather than once per node. A `Configuration` as the context
    is the run's configuration as it stands: resolved and validated by whoever started the run.
    """
    if isinstance(context, Configuration):
        return context  # resolved and validated once by whoever started the run
    settings = _configurable_settings((config or {}).get("configurable") or {})
    settings.update(_context_settings(context))
    if served:
        for name in DEPLOYMENT_SETTINGS:
            if name in settings:
                raise ConfigurationError(f"setting '{name}' belongs to the server's configuration, not to a run")
        preset = settings.get("config_file")
        if preset is not None and preset not in presets():
            raise ConfigurationError(f"setting 'config_file' must be one of the presets: {', '.join(presets())}")
    config_file = settings.get("config_file") or os.environ.get(CONFIG_FILE_ENV)
    stamp = _file_stamp(config_file)
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    key = json.dumps(settings, sort_keys=True, default=repr)
    return _load_cached(key, env, stamp)


@lru_cache(maxsize=64)
def _load_cached(settings_json: str, env: tuple[tuple[str, str], ...], file_stamp: Any) -> Configuration:
    """`Configuration.load` of the JSON-encoded settings; `env` and `file_stamp` only key the cache."""
    return Configuration.load(overrides=json.loads(settings_json))


def _file_stamp(config_file: str | None) -> Any:
    if not config_file:
        return None
    path = preset_path(config_file)
    try:
        return str(path.resolve()), path.stat().st_mtime_ns
    except OSError:
        return str(path), None


def _configurable_settings(configurable: dict[str, Any]) -> dict[str, Any]:
    known = set(RunSettings.model_fields)
    for key in configurable:
        if isinstance(key, str) and key not in known and not key.startswith("__"):
            if difflib.get_close_matches(key, known, n=1, cutoff=0.85):
                raise ConfigurationError(unknown_setting_message(key, known))
    return {k: v for k, v in configurable.items() if k in known and v is not None}


def _context_settings(context: Any) -> dict[str, Any]:
    if context is None:
        return {}
    if isinstance(context, BaseModel):
        return {k: getattr(context, k) for k in context.model_fields_set if getattr(context, k) is not None}
    if not isinstance(context, dict):
        raise ConfigurationError(f"the run's context must be a mapping of settings, not {type(context).__name__}")
    for key in context:
        if key not in RunSettings.model_fields:
            raise ConfigurationError(unknown_setting_message(str(key), RunSettings.model_fields))
    return {k: v for k, v in context.items() if v is not None}


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
    unknown = sorted(str(k) for k in data if k not in FLAT_NAMES and k not in Configuration.model_fields)
    if unknown:
        raise ConfigurationError(f"config file {path} has unknown keys: {', '.join(unknown)}")
    return data


def _read_env() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in FLAT_NAMES:
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = yaml.safe_load(raw) if raw.strip() else None
    return values

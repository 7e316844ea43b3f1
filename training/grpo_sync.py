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
  drops KV blocks computed with the old weights. That route answers 200 even when the reset failed, which
  it does while any request holds KV blocks, so the reset is made and checked on the server's
  ``/metrics`` (`reset_prefix_cache`). vLLM returns ``prompt_token_ids`` / ``token_ids`` with
  ``"return_token_ids": true`` and logprobs with ``"logprobs": true``; the `openai` policy asks for both.

The vLLM side is written against vLLM's documented dev-mode ``/collective_rpc`` and worker-extension
hooks and is not exercised here (vLLM does not install on a CPU machine); the serve-policy side is
tested over real HTTP.
"""

from __future__ import annotations

import logging
import time
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
    if config.weight_sync == "none":
        return
    folder = write_trained(model, Path(folder).resolve())
    root = server_root(config.base_url)
    if config.weight_sync == "serve-policy":
        _post(root + "/v1/load_weights", {"path": str(folder)}, timeout_s)
    else:
        _post(root + "/collective_rpc", {"method": "reload_weights_from", "args": [str(folder)]}, timeout_s)
        reset_prefix_cache(root, timeout_s)
    logger.info("synced weights from %s to %s", folder, root)


def _post(url: str, body: Any, timeout_s: float) -> None:
    import httpx

    response = httpx.post(url, json=body, timeout=timeout_s)
    if response.status_code >= 400:
        raise RuntimeError(f"weight sync {url} failed ({response.status_code}): {response.text[:300]}")


#: vLLM's scheduler gauges that are zero only when no request holds KV blocks, and counters that move
#: whenever a request is scheduled (`vllm.v1.metrics.loggers.PrometheusStatLogger`).
IDLE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
ACTIVITY_COUNTERS = ("vllm:prompt_tokens_total", "vllm:prefix_cache_queries_total")


def server_load(root: str, timeout_s: float = 30.0) -> tuple[float, float]:
    """(sum of IDLE_GAUGES, sum of ACTIVITY_COUNTERS) over every engine, from ``{root}/metrics``.

    Raises:
        RuntimeError: the server has no Prometheus metrics or lacks vLLM's scheduler gauges.
    """
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(root + "/metrics", timeout=timeout_s)
    if response.status_code >= 400:
        raise RuntimeError(f"weight sync {root}/metrics failed ({response.status_code}): {response.text[:300]}")
    samples = [s for family in text_string_to_metric_families(response.text) for s in family.samples]
    found = {s.name for s in samples}
    if not set(IDLE_GAUGES) <= found:
        raise RuntimeError(f"{root}/metrics lacks {sorted(set(IDLE_GAUGES) - found)}: is it vLLM with metrics on?")
    return (sum(s.value for s in samples if s.name in IDLE_GAUGES),
            sum(s.value for s in samples if s.name in ACTIVITY_COUNTERS))


def reset_prefix_cache(root: str, timeout_s: float = 300.0, poll_s: float = 0.5) -> int:
    """Reset vLLM's prefix cache and make sure it took effect; returns the resets it took.

    vLLM's reset fails (answering 200 all the same) while any request holds KV blocks. So: wait until
    its gauges say no request runs, waits or holds a block, reset, and read the metrics again; the
    reset took effect when the server was still idle and nothing was scheduled in between (the
    activity counters did not move). Otherwise wait and reset again.

    Raises:
        RuntimeError: the server did not go idle within `timeout_s` (a stray client keeps it busy).
    """
    deadline = time.monotonic() + timeout_s
    attempts = 0
    while True:
        load, activity = server_load(root)
        if load == 0:
            attempts += 1
            _post(root + "/reset_prefix_cache", None, timeout_s)
            after_load, after_activity = server_load(root)
            if after_load == 0 and after_activity == activity:
                return attempts
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"weight sync: {root} still had requests holding KV blocks after {timeout_s:g}s, so its prefix "
                "cache could not be reset; stop other clients of the rollout server"
            )
        logger.info("rollout server busy; waiting to reset its prefix cache")
        time.sleep(poll_s)


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

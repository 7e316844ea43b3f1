"""GRPO's weight sync to a vLLM rollout server: the prefix-cache reset is made when it can take effect."""

from __future__ import annotations

import pytest
import torch

from training.grpo_config import GRPOJobConfig
from training.grpo_sync import WEIGHTS_FILE, sync_weights
from vllm_dev_server import VLLMDevServer


def _sync(server: VLLMDevServer, tmp_path, timeout_s: float = 60.0) -> None:
    config = GRPOJobConfig(output_dir=str(tmp_path), rollout_backend="openai", base_url=server.base_url, weight_sync="vllm")
    sync_weights(config, torch.nn.Linear(2, 2), tmp_path / "sync", timeout_s=timeout_s)


def test_vllm_sync_waits_for_requests_in_flight_before_resetting_the_prefix_cache(tmp_path):
    with VLLMDevServer(busy_polls=3) as server:
        _sync(server, tmp_path)
    assert server.rpc == [{"method": "reload_weights_from", "args": [str((tmp_path / "sync").resolve())]}]
    assert (tmp_path / "sync" / WEIGHTS_FILE).is_file()
    assert server.effective_resets == 1 and server.resets == 1, "the reset must run once no request holds blocks"


def test_a_reset_beaten_by_a_new_request_is_made_again(tmp_path):
    with VLLMDevServer(arrivals_at_reset=2) as server:
        _sync(server, tmp_path)
    assert server.resets == 3 and server.effective_resets == 1


def test_a_server_that_never_goes_idle_stops_training_with_one_clear_error(tmp_path):
    with VLLMDevServer(busy_polls=10**9) as server:
        with pytest.raises(RuntimeError, match="still had requests holding KV blocks") as error:
            _sync(server, tmp_path, timeout_s=1.0)
    assert "\n" not in str(error.value) and server.resets == 0

"""Policy backends: what decides the next tool call. DESIGN §5."""

from __future__ import annotations

from functools import lru_cache

from graph.configuration import Configuration
from graph.policies.base import Policy, PolicyError
from graph.policies.scripted import ScriptedPolicy

__all__ = ["Policy", "PolicyError", "check_policy", "get_policy"]


def get_policy(config: Configuration) -> Policy:
    """The policy backend named by `config.policy`, shared across steps and runs with the same settings.

    Raises:
        PolicyError: the backend cannot be set up (no endpoint given for `openai`...).
    """
    if config.policy == "scripted":
        return ScriptedPolicy()
    if config.policy == "openai":
        return _openai(config.base_url, config.model, config.api_key, config.request_timeout_s, config.max_retries)
    if config.policy == "local":
        return _local(config.model)
    raise PolicyError(f"unknown policy '{config.policy}'; use scripted, openai or local")


def check_policy(config: Configuration) -> Policy:
    """The policy, set up and checked before runs start: the endpoint answers, the model folder loads.

    Raises:
        PolicyError: with the one-line reason, so the CLI stops before a batch of failed runs.
    """
    policy = get_policy(config)
    check = getattr(policy, "check", None)
    if check is not None:
        check()
    return policy


@lru_cache(maxsize=8)
def _openai(base_url: str | None, model: str | None, api_key: str, timeout_s: float, max_retries: int) -> Policy:
    from graph.policies.openai_policy import OpenAIPolicy

    return OpenAIPolicy.from_config(
        Configuration(
            policy="openai", base_url=base_url, model=model, api_key=api_key,
            request_timeout_s=timeout_s, max_retries=max_retries,
        )
    )


@lru_cache(maxsize=4)
def _local(model: str | None) -> Policy:
    from graph.policies.local_policy import LocalPolicy

    return LocalPolicy(model)

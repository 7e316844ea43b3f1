"""Policy backends: what decides the next tool call. DESIGN §5."""

from __future__ import annotations

from functools import lru_cache

from graph.configuration import Configuration, ConnectionSettings
from graph.policies.base import Policy, PolicyError
from graph.policies.scripted import ScriptedPolicy

__all__ = ["Policy", "PolicyError", "check_policy", "get_policy"]


def get_policy(config: Configuration) -> Policy:
    """The policy backend named by `config.policy.kind`, shared across steps and runs with the same settings.

    Raises:
        PolicyError: the backend cannot be set up (no endpoint given for `openai`...).
    """
    policy = config.policy
    if policy.kind == "scripted":
        return ScriptedPolicy()
    if policy.kind == "openai":
        return _openai(policy.base_url, policy.model, config.connection)
    if policy.kind == "local":
        return _local(policy.model)
    raise PolicyError(f"unknown policy '{policy.kind}'; use scripted, openai or local")


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
def _openai(base_url: str | None, model: str | None, connection: ConnectionSettings) -> Policy:
    from graph.policies.openai_policy import OpenAIPolicy

    return OpenAIPolicy.from_config(Configuration(policy={"kind": "openai", "base_url": base_url, "model": model},
                                                  connection=connection))


@lru_cache(maxsize=4)
def _local(model: str | None) -> Policy:
    from graph.policies.local_policy import LocalPolicy

    return LocalPolicy(model)

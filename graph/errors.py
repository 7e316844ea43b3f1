"""Errors shared by the policy adapters and the local inference engine."""


class PolicyError(RuntimeError):
    """The policy could not produce a message (dead endpoint, model failed to load...)."""

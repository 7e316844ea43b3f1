"""The policy interface: given the run so far, the next assistant message."""

from __future__ import annotations

from typing import Protocol

from langchain_core.messages import AIMessage

from graph.configuration import Configuration
from graph.errors import PolicyError
from graph.state import AgentState

__all__ = ["Policy", "PolicyError"]


class Policy(Protocol):
    def decide(self, state: AgentState, config: Configuration) -> AIMessage:
        """The next assistant message: a thought plus at most one tool call, or a final answer."""
        ...

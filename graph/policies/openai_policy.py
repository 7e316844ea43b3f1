"""The `openai` policy: any OpenAI-compatible chat endpoint with tool calling (DESIGN §5).

Works with servers that parse tool calls themselves (vLLM with ``--enable-auto-tool-choice
--tool-call-parser hermes``, `anomaly-agent serve-policy`, hosted APIs) and with servers that return the
model's raw text (the ``<tool_call>`` blocks are parsed here). Retries and timeouts come from
`tools.llm_client`; when the endpoint stays unreachable the policy raises `PolicyError`, which the
graph's policy node turns into a finished run with status ``policy_error`` (never a hang).
"""

from __future__ import annotations

import logging
from typing import Any

from langchain_core.messages import AIMessage

from graph.configuration import Configuration
from graph.policies.base import PolicyError
from graph.policies.chat import chat_messages, tools_for_policy, turn_seed
from graph.inference.hermes import TOOL_CALL_CLOSE, parse_completion
from graph.state import AgentState
from tools.llm_client import ChatClient, LLMEndpointError

logger = logging.getLogger(__name__)


class OpenAIPolicy:
    """Asks a chat endpoint for each next message."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    @classmethod
    def from_config(cls, config: Configuration) -> "OpenAIPolicy":
        policy, connection = config.policy, config.connection
        if not policy.base_url:
            raise PolicyError(
                "the openai policy needs an endpoint: pass --base-url http://HOST:PORT/v1 "
                "(or set base_url in the configuration / ANOMALY_AGENT_BASE_URL)"
            )
        return cls(
            ChatClient(
                base_url=policy.base_url,
                model=policy.model,
                api_key=connection.api_key,
                timeout_s=connection.timeout_s,
                max_retries=connection.max_retries,
                purpose="policy",
            )
        )

    def check(self) -> None:
        """Raise `PolicyError` now if the endpoint is unreachable (the CLI calls this before any run)."""
        try:
            self.client.ping()
        except LLMEndpointError as error:
            raise PolicyError(str(error)) from error

    def decide(self, state: AgentState, config: Configuration) -> AIMessage:
        params: dict[str, Any] = {
            "tools": tools_for_policy(),
            "temperature": config.policy.temperature,
            "max_tokens": config.policy.max_tokens,
        }
        if config.policy.stop_after_tool_call:
            params["stop"] = [TOOL_CALL_CLOSE]
        if config.policy.temperature > 0:
            params["seed"] = turn_seed(state)
        if config.policy.record_token_ids:
            params["logprobs"] = True
            params["extra_body"] = {"return_token_ids": True}
        try:
            completion = self.client.complete(chat_messages(state, config), **params)
        except LLMEndpointError as error:
            raise PolicyError(str(error)) from error
        if not completion.choices:
            raise PolicyError(f"policy endpoint {self.client.base_url} returned no choices; check the server's logs")
        choice = completion.choices[0]
        message = choice.message
        extra = message.model_extra or {}
        reasoning = extra.get("reasoning_content") or extra.get("reasoning")
        metadata: dict[str, Any] = {"finish_reason": choice.finish_reason, "model_name": completion.model}
        if config.policy.record_token_ids:
            metadata.update(_token_record(completion, choice))
        return parse_completion(message.content, message.tool_calls, reasoning=reasoning, metadata=metadata)


def _token_record(completion: Any, choice: Any) -> dict[str, Any]:
    """Generated token ids and logprobs where the server returned them (vLLM and serve-policy field names)."""
    record: dict[str, Any] = {}
    choice_extra = choice.model_extra or {}
    if choice_extra.get("token_ids") is not None:
        record["token_ids"] = list(choice_extra["token_ids"])
    prompt_ids = (completion.model_extra or {}).get("prompt_token_ids")
    if prompt_ids is not None:
        record["prompt_token_ids"] = list(prompt_ids)
    if choice.logprobs is not None and choice.logprobs.content:
        record["logprobs"] = [float(t.logprob) for t in choice.logprobs.content]
    return record

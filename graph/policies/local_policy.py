"""The `local` policy: a transformers causal LM on the CPU, in this process (DESIGN §5).

It renders the run with the model's chat template and our tool schemas, generates one reply and parses
it like the `openai` policy does, through the same `LocalModel.generate` the `serve-policy` server uses,
so in-process and served runs of one model give the same messages.
"""

from __future__ import annotations

from langchain_core.messages import AIMessage

from graph.configuration import Configuration
from graph.policies.chat import chat_messages, tools_for_policy, turn_seed
from graph.inference.hermes import TOOL_CALL_CLOSE, parse_completion
from graph.inference import LocalModel, load_local_model
from graph.state import AgentState


class LocalPolicy:
    """A local Hugging Face model folder (default: the bundled SmolLM2-135M-Instruct)."""

    def __init__(self, model_path: str | None = None) -> None:
        self.model_path = model_path
        self._model: LocalModel | None = None

    @property
    def model(self) -> LocalModel:
        """Loaded on first use (and cached per path across policies)."""
        if self._model is None:
            self._model = load_local_model(self.model_path)
        return self._model

    def check(self) -> None:
        """Load the model now, so a bad folder fails before any run (the CLI calls this)."""
        _ = self.model

    def decide(self, state: AgentState, config: Configuration) -> AIMessage:
        generation = self.model.generate(
            chat_messages(state, config),
            tools=tools_for_policy(),
            temperature=config.policy.temperature,
            max_new_tokens=config.policy.max_tokens,
            stop=[TOOL_CALL_CLOSE] if config.policy.stop_after_tool_call else None,
            seed=turn_seed(state) if config.policy.temperature > 0 else None,
            logprobs=config.policy.record_token_ids,
        )
        metadata = {"finish_reason": generation.finish_reason, "model_name": self.model.name}
        if config.policy.record_token_ids:
            metadata.update(
                token_ids=generation.token_ids,
                prompt_token_ids=generation.prompt_token_ids,
                logprobs=generation.logprobs,
            )
        return parse_completion(generation.text, metadata=metadata)

"""The inference engine's value types: a generated reply, a batched decoding request, cancellation."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


class GenerationCancelled(RuntimeError):
    """Generation stopped because its `cancel` event was set."""


@dataclass
class Generation:
    """One generated reply.

    Attributes:
        text: The decoded reply, without the end-of-turn token and without a matched stop string.
        token_ids: Every generated token id, as sampled (including a stop string's tokens and the
            end-of-turn token), so training can use exactly what the policy produced.
        logprobs: Per generated token, its log-probability under the model's raw distribution
            (temperature 1, no top-k/top-p), as vLLM reports by default. Empty unless asked for.
        tokens: Per generated token, its decoded text (for OpenAI-style logprobs).
        prompt_token_ids: The rendered prompt's ids.
        finish_reason: "stop" (end of turn or a stop string) or "length" (hit max_new_tokens).
    """

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)


@dataclass
class DecodeRequest:
    """One row of a batched generation: a rendered prompt and how to sample its reply.

    `seed` seeds this row's own sampler, so a row's tokens do not depend on which rows share its batch.
    """

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    stop: list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    result: Generation | None = None
    error: BaseException | None = None

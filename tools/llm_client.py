"""A small client for OpenAI-compatible chat endpoints, with our own retries and one-line errors.

Why our own retries instead of the openai client's: the client's retry loop neither logs nor tells the
caller how many tries were made, and its final exception is a long multi-line repr. A batch of
thousands of samples needs a bounded, visible retry (exponential backoff on connection errors,
timeouts, 429 and 5xx) and, when the endpoint is really gone, a single line that names it and says what
to do. Everything that talks to a model server (the policy, PG-LLM, QE-VLM) goes through here, so the
behaviour is the same for all three. It lives in `tools/` because tools must not import `graph/`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import openai

logger = logging.getLogger(__name__)

#: Errors worth another try: the server may come back, or the next request may be faster.
_TRANSIENT = (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError, openai.RateLimitError)


class LLMEndpointError(RuntimeError):
    """An endpoint could not answer (unreachable, too slow, server errors after retries, bad request)."""


@dataclass
class ChatClient:
    """One OpenAI-compatible endpoint and model.

    Args:
        base_url: The endpoint, e.g. ``http://127.0.0.1:8000/v1``.
        model: Model name to send; None asks the server (``GET /models``) and uses the first it lists.
        api_key: Sent as a bearer token; local servers ignore it.
        timeout_s: Per-request timeout.
        max_retries: Extra tries after the first on transient errors.
        backoff_s: First wait between tries; doubled each time.
        purpose: What the endpoint is for ("policy", "PG", "judge"), used in error messages.
    """

    base_url: str
    model: str | None = None
    api_key: str = "EMPTY"
    timeout_s: float = 60.0
    max_retries: int = 2
    backoff_s: float = 0.5
    purpose: str = "LLM"
    _client: openai.OpenAI | None = field(default=None, init=False, repr=False)

    @property
    def client(self) -> openai.OpenAI:
        if self._client is None:
            self._client = openai.OpenAI(
                base_url=self.base_url, api_key=self.api_key or "EMPTY", timeout=self.timeout_s, max_retries=0
            )
        return self._client

    def model_name(self) -> str:
        """The configured model, or the first one the server lists (single-model servers)."""
        if self.model:
            return self.model
        listing = self._with_retries(lambda: self.client.models.list())
        names = [m.id for m in listing.data]
        if not names:
            raise LLMEndpointError(f"{self.purpose} endpoint {self.base_url} serves no models; pass the model name")
        self.model = names[0]
        return self.model

    def ping(self) -> None:
        """Fail now, with the one-line error, when the endpoint cannot be reached (before a batch starts).

        Uses ``GET /models``; a server that does not implement it (HTTP 404...) is taken as reachable.
        """
        try:
            listing = self._with_retries(lambda: self.client.models.list())
            if not self.model and listing.data:
                self.model = listing.data[0].id
        except LLMEndpointError as error:
            if not isinstance(error.__cause__, openai.APIStatusError) or isinstance(error.__cause__, openai.InternalServerError):
                raise

    def complete(self, messages: list[dict[str, Any]], **params: Any) -> Any:
        """One chat completion (`openai` ChatCompletion); `params` go to ``chat.completions.create``.

        Raises:
            LLMEndpointError: after the retries, or at once for a request the server refuses (4xx).
        """
        model = self.model_name()
        return self._with_retries(lambda: self.client.chat.completions.create(model=model, messages=messages, **params))

    def _with_retries(self, request: Any) -> Any:
        tries = self.max_retries + 1
        for attempt in range(1, tries + 1):
            try:
                return request()
            except _TRANSIENT as error:
                if attempt == tries:
                    what, detail = _describe(error)
                    raise LLMEndpointError(
                        f"{self.purpose} endpoint {self.base_url} {what} after {tries} "
                        f"{'try' if tries == 1 else 'tries'}: {detail}; check that the server is running and "
                        f"reachable, or raise request_timeout_s / max_retries"
                    ) from error
                wait = self.backoff_s * 2 ** (attempt - 1)
                logger.warning("%s endpoint %s %s (%s); retrying in %.1fs (try %d of %d)", self.purpose,
                               self.base_url, *_describe(error), wait, attempt, tries)
                time.sleep(wait)
            except openai.APIStatusError as error:
                raise LLMEndpointError(
                    f"{self.purpose} endpoint {self.base_url} refused the request (HTTP {error.status_code}): "
                    f"{_first_line(error.message)}; check the model name, api_key and the server's options"
                ) from error
            except openai.OpenAIError as error:
                raise LLMEndpointError(f"{self.purpose} endpoint {self.base_url}: {_first_line(str(error))}") from error
        raise AssertionError("unreachable")


def _describe(error: Exception) -> tuple[str, str]:
    """(what happened, the detail) for a transient error, e.g. ("unreachable", "Connection refused")."""
    if isinstance(error, openai.APITimeoutError):
        return "timed out", "no answer within the request timeout"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error.__context__
        return "unreachable", _first_line(str(cause) or type(cause).__name__) if cause else _first_line(str(error))
    if isinstance(error, openai.APIStatusError):
        return f"answered HTTP {error.status_code}", _first_line(error.message)
    return "failed", _first_line(str(error))


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else "no details"
    return line if len(line) <= 200 else line[:197] + "..."

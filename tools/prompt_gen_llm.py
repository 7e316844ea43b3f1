"""PG, the production backend: an LLM writes the editing instruction, through an OpenAI-compatible endpoint.

Why the vocabulary goes into the system prompt: the instruction is read by IG, and the embedded engine
understands only the words of `tools.vocabulary` (shape nouns, sizes, contrasts, positions...). A hosted
editing model reads free English too, so the vocabulary is a strong suggestion, not a filter. When the
endpoint fails or answers nothing usable, the template backend writes the instruction instead (logged),
so a run never stops at PG.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from tools.llm_client import ChatClient, LLMEndpointError
from tools.prompt_gen import TemplatePromptGenerator
from tools.types import PromptRequest
from tools.vocabulary import COLOURS, CONTRASTS, POSITIONS, SHAPE_FAMILIES, SIZES, SOFTNESSES, DefectSpec, render_instruction

logger = logging.getLogger(__name__)

_EXAMPLE = render_instruction(
    DefectSpec(shape="scratch", family="line", position="top-left", size="small", contrast="high", softness="sharp",
               colour="dark"),
    subject="the metal nut",
)

SYSTEM_PROMPT = f"""You write one local image-editing instruction that adds a single realistic industrial \
defect to a photo of a product. Answer with the instruction only: one sentence, no preamble, no quotes.
Use these words, which the image editor understands:
- defect shape: {", ".join(SHAPE_FAMILIES)}
- size: {", ".join(SIZES)}
- colour: {", ".join(COLOURS)}
- edges: {", ".join(SOFTNESSES)} edges
- contrast: {", ".join(CONTRASTS)} contrast
- position: {", ".join(POSITIONS)}
Example: {_EXAMPLE}"""

_MAX_CHARS = 400


class LLMPromptGenerator:
    """Asks a chat model for the instruction; falls back to the template backend on failure."""

    def __init__(self, client: ChatClient, temperature: float = 0.7, max_tokens: int = 120, attempts: int = 2) -> None:
        self.client = client
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.attempts = attempts
        self.fallback = TemplatePromptGenerator()

    def generate(self, request: PromptRequest) -> str:
        """One instruction for `request` (seeded where the server honours ``seed``)."""
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_prompt(request)},
        ]
        for attempt in range(self.attempts):
            try:
                completion = self.client.complete(
                    messages, temperature=self.temperature, max_tokens=self.max_tokens, seed=request.seed + attempt
                )
            except LLMEndpointError as error:
                logger.warning("PG-LLM failed, using the template instruction: %s", error)
                break
            text = clean_instruction(completion.choices[0].message.content if completion.choices else "")
            if text:
                return text
            logger.info("PG-LLM answered no usable instruction (try %d of %d)", attempt + 1, self.attempts)
        return self.fallback.generate(request)


def user_prompt(request: PromptRequest) -> str:
    """The task, the knowledge and the feedback, as the model reads them."""
    lines = [f"Product: {request.subject} (category {request.category}). Defect type: {request.anomaly_type}."]
    if request.knowledge:
        lines.append("What this defect looks like:")
        lines += [f"- {entry.as_text()}" for entry in request.knowledge[:3]]
    if request.feedback:
        lines.append(f"Rework the previous instruction with this feedback: {request.feedback}")
    lines.append("Write the instruction.")
    return "\n".join(lines)


def clean_instruction(text: str | None) -> str:
    """The first sentence-like line of a reply, without quotes, labels or markdown; '' if none."""
    for line in (text or "").splitlines():
        line = re.sub(r"^\s*(?:[-*#>]+|\d+[.)]|instruction\s*:)\s*", "", line, flags=re.IGNORECASE).strip().strip("\"'`")
        if len(line) >= 8 and re.search(r"[a-zA-Z]{3}", line):
            return line[:_MAX_CHARS]
    return ""

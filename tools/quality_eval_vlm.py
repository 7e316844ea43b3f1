"""QE, the production backend: a VLM judges the edit from both images, through an OpenAI-compatible endpoint.

Why validated and with a fallback: a VLM's JSON is sometimes malformed or out of range, and a judge that
crashes a run (or passes garbage on as a score) is worse than a plainer judge. The reply is validated
with pydantic against the same fields as `tools.types.Evaluation`; an invalid reply is retried with the
validation error shown to the model; after `attempts` tries (or when the endpoint is down) the metric
judge scores the image instead and the evaluation says ``judge="metric-fallback"``. The pass flag comes
from the configured thresholds, not from the model, so both judges pass images by the same rule.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from tools.imaging import encode_data_url
from tools.llm_client import ChatClient, LLMEndpointError
from tools.quality_eval import MetricJudge
from tools.types import Evaluation, EvaluationRequest
from tools.vocabulary import Fix, format_fixes

logger = logging.getLogger(__name__)


class Verdict(BaseModel):
    """What the VLM must answer (the model-written part of `Evaluation`)."""

    location: float = Field(ge=0, le=5, description="0-5: on the object, in a plausible region, plausible size.")
    quality: float = Field(ge=0, le=5, description="0-5: visible, seamless, texture-consistent, nothing else changed.")
    review: str = Field(min_length=1, description="What is wrong and how to fix it, concretely.")
    fixes: list[Fix] = Field(default_factory=list, description="Changes to the instruction, in the vocabulary.")


SYSTEM_PROMPT = """You are a strict quality inspector for synthetic industrial defect images. You get the \
normal image (A) and the edited image (B) that should show one realistic defect of the named type.
Score location 0-5 (the defect is on the product, in a plausible place, with a plausible size) and quality \
0-5 (visible, realistic, seamless, consistent with the surface texture and lighting, the same camera \
noise, blur and JPEG blocking inside the defect as around it, a textured rather than flat inside, nothing \
changed outside the defect). Write a short review naming concrete fixes. Each fix changes one attribute \
of the instruction: position, size (tiny/small/medium/large), contrast (low/medium/high), softness \
(sharp/soft), colour, count (1-4), region, outline (smooth/ragged), interior (uniform/mottled/textured) \
or noise (match: keep the image's own grain).
Answer with one JSON object only, matching this JSON schema:
""" + json.dumps(Verdict.model_json_schema())


class VLMJudge:
    """Asks a VLM for a verdict; falls back to `MetricJudge`."""

    def __init__(
        self, client: ChatClient, pass_location: float = 3.0, pass_quality: float = 3.0, attempts: int = 2,
        max_tokens: int = 400,
    ) -> None:
        self.client = client
        self.pass_location = pass_location
        self.pass_quality = pass_quality
        self.attempts = attempts
        self.max_tokens = max_tokens
        self.fallback = MetricJudge(pass_location=pass_location, pass_quality=pass_quality)

    def evaluate(self, normal: np.ndarray, edited: np.ndarray, request: EvaluationRequest) -> Evaluation:
        """Judge `edited` against `normal` (same contract as `MetricJudge.evaluate`)."""
        if normal.shape != edited.shape:
            raise ValueError(f"images differ in shape: {normal.shape} vs {edited.shape}")
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [
                {"type": "text", "text": _task_text(request)},
                {"type": "text", "text": "Image A (normal):"},
                {"type": "image_url", "image_url": {"url": encode_data_url(normal)}},
                {"type": "text", "text": "Image B (edited):"},
                {"type": "image_url", "image_url": {"url": encode_data_url(edited)}},
            ]},
        ]
        reason = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            try:
                completion = self.client.complete(messages, temperature=0.0, max_tokens=self.max_tokens)
            except LLMEndpointError as error:
                reason = str(error)
                break
            text = completion.choices[0].message.content if completion.choices else ""
            try:
                verdict = parse_verdict(text or "")
            except ValueError as error:
                reason = f"invalid verdict: {error}"
                logger.info("QE-VLM try %d of %d: %s", attempt, self.attempts, reason)
                messages += [
                    {"role": "assistant", "content": text or ""},
                    {"role": "user", "content": f"That answer is invalid ({error}). Answer with the JSON object only."},
                ]
                continue
            return self._evaluation(verdict, attempt)
        logger.warning("QE-VLM unavailable, the metric judge scores this image instead: %s", reason)
        evaluation = self.fallback.evaluate(normal, edited, request)
        return evaluation.model_copy(
            update={"judge": "metric-fallback", "details": {**evaluation.details, "vlm_failed_attempts": float(self.attempts)}}
        )

    def _evaluation(self, verdict: Verdict, attempts: int) -> Evaluation:
        review = verdict.review.strip()
        if verdict.fixes and "Fixes:" not in review:
            review = f"{review} {format_fixes(verdict.fixes)}"  # the policy reads fixes from the review text
        return Evaluation(
            location=round(verdict.location, 2),
            quality=round(verdict.quality, 2),
            passed=verdict.location >= self.pass_location and verdict.quality >= self.pass_quality,
            review=review,
            fixes=verdict.fixes,
            details={"vlm_attempts": float(attempts)},
            judge="vlm",
        )


def parse_verdict(text: str) -> Verdict:
    """The verdict in a reply: its first JSON object (code fences allowed), validated.

    Raises:
        ValueError: no JSON object, or one that does not match `Verdict` (the message names the field).
    """
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            try:
                return Verdict.model_validate(value)
            except ValidationError as error:
                first = error.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "object"
                raise ValueError(f"field '{field}': {first['msg']}") from None
    raise ValueError("no JSON object in the answer")


def _task_text(request: EvaluationRequest) -> str:
    kind = "texture (the whole image is the product surface)" if request.is_texture else "object"
    instruction = f" The editing instruction was: {request.prompt}" if request.prompt else ""
    return f"Category: {request.category} ({kind}). Defect type: {request.anomaly_type}.{instruction}"

"""IG's endpoint backend: any OpenAI-compatible image-edit endpoint (``POST <base_url>/images/edits``).

Why: hosted editors and local servers that speak OpenAI's image API (image + mask + prompt, multipart)
are the quickest way to a strong editor without loading weights in-process. As with the diffusers
backend, the procedural planner decides where the defect goes (`tools.edit_region`); the endpoint gets
the window around it and a mask in OpenAI's convention (a PNG whose *transparent* pixels are the area
to edit), and its answer is pasted back through the edit mask, so the result has the input's size and
nothing outside the mask changes.

Only what the target accepts is sent: the window goes at the supported size nearest its aspect ratio
(`image_edit_sizes`; GPT image models take 1024x1024, 1536x1024 and 1024x1536 and refuse others), the
answer is resized back to the window, and `response_format` is sent only when configured (GPT image
models answer HTTP 400 "Unknown parameter" to it and always return base64).

Transport is httpx with our own bounded retries (connection errors, timeouts, 429, 5xx; exponential
backoff), and one-line errors that name the endpoint and the configuration keys to check.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

from tools.edit_region import edit_result, model_size, paste_back, plan_edit, to_model
from tools.image_gen import ProceduralEngine
from tools.image_gen_diffusers import model_prompt
from tools.types import BackendUnavailableError, GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)


class ImageEditEndpointError(BackendUnavailableError):
    """The image-edit endpoint could not answer (unreachable, too slow, refused, or a bad answer)."""


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def openai_mask(edit: Image.Image) -> Image.Image:
    """OpenAI's mask convention from an L mask (255 = edit): RGBA, alpha 0 where the image may change."""
    alpha = Image.fromarray(np.where(np.asarray(edit) > 127, 0, 255).astype(np.uint8), "L")
    mask = Image.new("RGBA", edit.size, (0, 0, 0, 255))
    mask.putalpha(alpha)
    return mask


#: Sizes GPT image models accept for edits (besides 'auto'), as (width, height).
GPT_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((1024, 1024), (1536, 1024), (1024, 1536))


def parse_sizes(text: str) -> tuple[tuple[int, int], ...] | None:
    """'1024x1024,1536x1024' -> ((1024, 1024), (1536, 1024)); 'any' -> None (the server takes any size).

    Raises:
        ValueError: an entry is not WIDTHxHEIGHT with positive integers.
    """
    if text.strip().lower() == "any":
        return None
    sizes = []
    for entry in (part.strip() for part in text.split(",") if part.strip()):
        width, _, height = entry.lower().partition("x")
        if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
            raise ValueError(f"{entry!r} is not WIDTHxHEIGHT (e.g. 1024x1024), nor 'any'")
        sizes.append((int(width), int(height)))
    if not sizes:
        raise ValueError("no size given; list WIDTHxHEIGHT sizes or say 'any'")
    return tuple(sizes)


def nearest_size(window: tuple[int, int], sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The size whose aspect ratio is nearest the window's (by log ratio; ties to the larger area)."""
    aspect = math.log(window[0] / window[1])
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


@dataclass
class EndpointImageEditor:
    """`ImageGenerator` over an OpenAI-compatible ``/images/edits`` endpoint.

    Args:
        base_url: The endpoint root, e.g. ``http://127.0.0.1:8001/v1`` (``image_edit_base_url``).
        model: Model name to send, or None to let the server choose (``image_edit_model``).
        api_key: Bearer token; local servers ignore it.
        size: Long side of the window sent when `sizes` is None (``image_edit_size``).
        sizes: The sizes the endpoint accepts (``image_edit_sizes``); the window is stretched to the one
            nearest its aspect and the answer stretched back. None: any size (the window's own aspect).
        response_format: Sent only when set (``image_edit_response_format``).
        init: ``sketch`` (send the procedurally drawn defect) or ``normal``.
        timeout_s: Per-request timeout.
        max_retries: Extra tries on transient errors.
        backoff_s: First wait between tries, doubled each time.
    """

    base_url: str
    model: str | None = None
    api_key: str = "EMPTY"
    size: int = 1024
    sizes: tuple[tuple[int, int], ...] | None = GPT_IMAGE_SIZES
    response_format: str | None = None
    init: str = "sketch"
    timeout_s: float = 120.0
    max_retries: int = 2
    backoff_s: float = 0.5
    planner: ProceduralEngine = field(default_factory=ProceduralEngine, repr=False)

    def generate(self, image: np.ndarray, request: GenerationRequest) -> GenerationResult:
        """Plan the defect, have the endpoint edit its window, paste the answer back."""
        plan = plan_edit(self.planner, image, request)
        x0, y0, x1, y1 = plan.window
        width, height = model_size(plan.window, self.size) if self.sizes is None else nearest_size((x1 - x0, y1 - y0), self.sizes)
        init = plan.sketch if self.init == "sketch" else image
        data = {"prompt": model_prompt(request, plan.sketch_result.info.get("shape")), "n": "1", "size": f"{width}x{height}"}
        if self.response_format:
            data["response_format"] = self.response_format
        if self.model:
            data["model"] = self.model
        edit_area = openai_mask(to_model(plan.crop(plan.edit_mask), (width, height)))
        files = {
            "image": ("image.png", png_bytes(to_model(plan.crop(init), (width, height))), "image/png"),
            "mask": ("mask.png", png_bytes(edit_area), "image/png"),
        }
        started = time.perf_counter()
        answer = self._post(data, files)
        output = self._decode(answer)
        seconds = time.perf_counter() - started
        edited = paste_back(image, output, plan)
        info = {
            "engine": "endpoint",
            "endpoint": self.base_url,
            "model": self.model or "",
            "seed": request.seed,
            "init": self.init,
            "model_size": [width, height],
            "seconds": round(seconds, 3),
        }
        return edit_result(image, edited, plan, info)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/images/edits"

    def _post(self, data: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> dict[str, Any]:
        tries = self.max_retries + 1
        headers = {"Authorization": f"Bearer {self.api_key or 'EMPTY'}"}
        for attempt in range(1, tries + 1):
            try:
                response = httpx.post(self.url, data=data, files=files, headers=headers, timeout=self.timeout_s)
            except httpx.TimeoutException:
                problem = f"timed out (no answer within {self.timeout_s:g}s)"
            except httpx.TransportError as error:
                problem = f"unreachable ({_first_line(str(error)) or type(error).__name__})"
            else:
                if response.status_code == 429 or response.status_code >= 500:
                    problem = f"answered HTTP {response.status_code}"
                elif response.status_code >= 400:
                    raise ImageEditEndpointError(
                        f"image-edit endpoint {self.url} refused the request (HTTP {response.status_code}): "
                        f"{_first_line(response.text)}; check image_edit_model, api_key and the server's options"
                    )
                else:
                    try:
                        return response.json()
                    except ValueError:
                        raise ImageEditEndpointError(
                            f"image-edit endpoint {self.url} answered something that is not JSON: "
                            f"{_first_line(response.text)}"
                        ) from None
            if attempt == tries:
                raise ImageEditEndpointError(
                    f"image-edit endpoint {self.url} {problem} after {tries} {'try' if tries == 1 else 'tries'}; "
                    "check that the server is running (image_edit_base_url), or raise request_timeout_s / max_retries"
                )
            wait = self.backoff_s * 2 ** (attempt - 1)
            logger.warning("image-edit endpoint %s %s; retrying in %.1fs (try %d of %d)", self.url, problem, wait,
                           attempt, tries)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _decode(self, answer: dict[str, Any]) -> Image.Image:
        try:
            item = answer["data"][0]
            if item.get("b64_json"):
                raw = base64.b64decode(item["b64_json"])
            else:
                raw = httpx.get(item["url"], timeout=self.timeout_s).content
            return Image.open(io.BytesIO(raw)).convert("RGB")
        except (KeyError, IndexError, TypeError, ValueError, OSError, httpx.HTTPError) as error:
            raise ImageEditEndpointError(
                f"image-edit endpoint {self.url} gave no usable image ({type(error).__name__}: "
                f"{_first_line(str(error))}); it must answer {{'data': [{{'b64_json': ...}}]}}"
            ) from None


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= 200 else line[:197] + "..."

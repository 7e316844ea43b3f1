"""IG's endpoint backend: any OpenAI-compatible image-edit endpoint (``POST <base_url>/images/edits``).

Why: hosted editors and local servers that speak OpenAI's image API (image + mask + prompt, multipart)
are the quickest way to a strong editor without loading weights in-process. As with the diffusers
backend, the procedural planner decides where the defect goes (`tools.edit_region`); the endpoint gets
the window around it and a mask in OpenAI's convention (a PNG whose *transparent* pixels are the area
to edit), and its answer is pasted back through the edit mask, so the result has the input's size and
nothing outside the mask changes.

Transport is httpx with our own bounded retries (connection errors, timeouts, 429, 5xx; exponential
backoff), and one-line errors that name the endpoint and the configuration keys to check.
"""

from __future__ import annotations

import base64
import io
import logging
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


@dataclass
class EndpointImageEditor:
    """`ImageGenerator` over an OpenAI-compatible ``/images/edits`` endpoint.

    Args:
        base_url: The endpoint root, e.g. ``http://127.0.0.1:8001/v1`` (``image_edit_base_url``).
        model: Model name to send, or None to let the server choose (``image_edit_model``).
        api_key: Bearer token; local servers ignore it.
        size: Long side of the window sent to the endpoint (``image_edit_size``).
        init: ``sketch`` (send the procedurally drawn defect) or ``normal``.
        timeout_s: Per-request timeout.
        max_retries: Extra tries on transient errors.
        backoff_s: First wait between tries, doubled each time.
    """

    base_url: str
    model: str | None = None
    api_key: str = "EMPTY"
    size: int = 1024
    init: str = "sketch"
    timeout_s: float = 120.0
    max_retries: int = 2
    backoff_s: float = 0.5
    planner: ProceduralEngine = field(default_factory=ProceduralEngine, repr=False)

    def generate(self, image: np.ndarray, request: GenerationRequest) -> GenerationResult:
        """Plan the defect, have the endpoint edit its window, paste the answer back."""
        plan = plan_edit(self.planner, image, request)
        width, height = model_size(plan.window, self.size)
        init = plan.sketch if self.init == "sketch" else image
        data = {
            "prompt": model_prompt(request, plan.sketch_result.info.get("shape")),
            "n": "1",
            "size": f"{width}x{height}",
            "response_format": "b64_json",
        }
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

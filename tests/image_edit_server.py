"""A small OpenAI-compatible image-edit server for tests: real HTTP on 127.0.0.1, real edits.

Why: the endpoint backend must be tested over sockets and multipart bodies exactly as it talks to a
hosted editor. This server implements ``POST /v1/images/edits`` as OpenAI documents it: it reads the
image, the mask (transparent pixels = the area to edit) and the prompt, darkens the image inside the
mask and draws a seeded pattern there, and answers ``{"data": [{"b64_json": ...}]}`` at the requested
size, or at `out_size` when given, so the client must resize the answer back.

It is as strict as OpenAI's API for GPT image models: an unknown form field (``response_format``
among them, unless `accepts_response_format`) is HTTP 400 "Unknown parameter", and a ``size`` outside
`sizes` (default 1024x1024, 1536x1024, 1024x1536 and auto; None accepts any) is HTTP 400.

Script steps (the last repeats): ``{}`` edit, ``{"status": 500}`` fail with that status,
``{"sleep": s}`` wait before answering. Every parsed request is kept in `requests`.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
from PIL import Image

from scripted_http import JSONHandler, ScriptedServer


def parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """Fields of a multipart/form-data body: text for plain fields, bytes for files."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        fields[name] = payload if part.get_filename() else payload.decode()
    return fields


def darken_masked(image: Image.Image, mask: Image.Image, prompt: str, out_size: int | tuple[int, int] | str) -> Image.Image:
    """The edit: inside the mask's transparent area, darken and add stripes whose phase follows the prompt."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    alpha = np.asarray(mask.convert("RGBA"))[..., 3]
    edit = alpha < 128
    h, w = edit.shape
    stripes = (np.add.outer(np.arange(h), np.arange(w)) + len(prompt)) % 6 < 3
    out = rgb.copy()
    out[edit] = rgb[edit] * 0.35 + np.where(stripes[edit], 25.0, 0.0)[:, None]
    if isinstance(out_size, str):
        out_size = tuple(int(side) for side in out_size.split("x"))
    elif isinstance(out_size, int):
        out_size = (out_size, out_size)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).resize(out_size, Image.BILINEAR)


#: Form fields OpenAI's /images/edits takes for GPT image models.
KNOWN_FIELDS = frozenset({"image", "image[]", "mask", "prompt", "model", "n", "size", "quality", "background", "user",
                          "output_format", "output_compression", "input_fidelity", "stream", "partial_images"})
GPT_IMAGE_SIZES = ("1024x1024", "1536x1024", "1024x1536")


def _invalid(param: str, message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


class ImageEditServer(ScriptedServer):
    """Start with `with ImageEditServer([...]) as server:`; `server.base_url` ends in /v1."""

    def __init__(self, script: list[dict[str, Any]] | None = None, out_size: int | None = None, port: int = 0,
                 sizes: tuple[str, ...] | None = GPT_IMAGE_SIZES, accepts_response_format: bool = False) -> None:
        self.out_size = out_size
        self.sizes = sizes
        self.known_fields = KNOWN_FIELDS | ({"response_format"} if accepts_response_format else set())
        super().__init__(script or [{}], port=port)

    def refusal(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        """OpenAI's 400 body for a request it would refuse, or None."""
        for name in fields:
            if name not in self.known_fields:
                return _invalid(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
        size = fields.get("size", "auto")
        if self.sizes is not None and size not in (*self.sizes, "auto"):
            supported = ", ".join(f"'{s}'" for s in (*self.sizes, "auto"))
            return _invalid("size", f"Invalid value: '{size}'. Supported values are: {supported}.", "invalid_value")
        if "image" not in fields or "prompt" not in fields:
            return _invalid("image", "image and prompt are required", "missing_required_parameter")
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(JSONHandler):
            def do_POST(self) -> None:
                if not self.path.rstrip("/").endswith("/images/edits"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fields = parse_multipart(self.headers.get("Content-Type", ""), body)
                step = server._next_step(fields)
                if step.get("sleep"):
                    time.sleep(step["sleep"])
                if step.get("status"):
                    self._send(step["status"], {"error": {"message": f"scripted failure {step['status']}"}})
                    return
                refusal = server.refusal(fields)
                if refusal is not None:
                    self._send(400, refusal)
                    return
                image = Image.open(io.BytesIO(fields["image"]))
                mask = Image.open(io.BytesIO(fields["mask"])) if "mask" in fields else Image.new("RGBA", image.size)
                if image.size != mask.size:
                    self._send(400, _invalid("mask", "image and mask must have the same size", "invalid_value"))
                    return
                size = server.out_size or (image.size if fields.get("size", "auto") == "auto" else fields["size"])
                out = darken_masked(image, mask, fields["prompt"], size)
                buffer = io.BytesIO()
                out.save(buffer, format="PNG")
                self._send(200, {"created": int(time.time()),
                                 "data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]})

        return Handler

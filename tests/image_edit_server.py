"""A small OpenAI-compatible image-edit server for tests: real HTTP on 127.0.0.1, real edits.

Why: the endpoint backend must be tested over sockets and multipart bodies exactly as it talks to a
hosted editor. This server implements ``POST /v1/images/edits`` as OpenAI documents it: it reads the
image, the mask (transparent pixels = the area to edit) and the prompt, darkens the image inside the
mask and draws a seeded pattern there, and answers ``{"data": [{"b64_json": ...}]}`` at its own
output size (as hosted editors do), so the client must resize the answer back.

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


def darken_masked(image: Image.Image, mask: Image.Image, prompt: str, out_size: int) -> Image.Image:
    """The edit: inside the mask's transparent area, darken and add stripes whose phase follows the prompt."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    alpha = np.asarray(mask.convert("RGBA"))[..., 3]
    edit = alpha < 128
    h, w = edit.shape
    stripes = (np.add.outer(np.arange(h), np.arange(w)) + len(prompt)) % 6 < 3
    out = rgb.copy()
    out[edit] = rgb[edit] * 0.35 + np.where(stripes[edit], 25.0, 0.0)[:, None]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).resize((out_size, out_size), Image.BILINEAR)


class ImageEditServer(ScriptedServer):
    """Start with `with ImageEditServer([...]) as server:`; `server.base_url` ends in /v1."""

    def __init__(self, script: list[dict[str, Any]] | None = None, out_size: int = 256, port: int = 0) -> None:
        self.out_size = out_size
        super().__init__(script or [{}], port=port)

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
                if "image" not in fields or "mask" not in fields or "prompt" not in fields:
                    self._send(400, {"error": {"message": "image, mask and prompt are required"}})
                    return
                image = Image.open(io.BytesIO(fields["image"]))
                mask = Image.open(io.BytesIO(fields["mask"]))
                if image.size != mask.size:
                    self._send(400, {"error": {"message": "image and mask must have the same size"}})
                    return
                out = darken_masked(image, mask, fields["prompt"], server.out_size)
                buffer = io.BytesIO()
                out.save(buffer, format="PNG")
                self._send(200, {"created": int(time.time()),
                                 "data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]})

        return Handler

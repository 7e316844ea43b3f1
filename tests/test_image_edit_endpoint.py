"""IG's endpoint backend against a real OpenAI-compatible image-edit server over HTTP."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from graph.configuration import Configuration, ConfigurationError
from graph.toolbox import get_toolbox
from image_edit_server import ImageEditServer
from tools.edit_region import plan_edit
from tools.image_gen import ProceduralEngine
from tools.image_gen_endpoint import EndpointImageEditor, ImageEditEndpointError, nearest_size
from tools.imaging import load_image
from tools.types import GenerationRequest

REQUEST = GenerationRequest(prompt="a medium dark stain in the center", category="metal_nut",
                            anomaly_type="color", default_shape="stain", seed=5)


@pytest.fixture(scope="module")
def nut(sample_dir) -> np.ndarray:
    return load_image(sorted((sample_dir / "metal_nut").glob("*.png"))[0])


def _editor(base_url: str, **overrides) -> EndpointImageEditor:
    cfg = Configuration.load(overrides={"image_backend": "endpoint", "image_edit_base_url": base_url,
                                        "image_edit_size": 128, "request_timeout_s": 5, **overrides})
    editor = get_toolbox(cfg).image
    assert isinstance(editor, EndpointImageEditor)
    editor.backoff_s = 0.05
    return editor


def test_endpoint_edit_is_pasted_back_inside_the_mask_at_the_input_size(nut):
    with ImageEditServer(out_size=256) as server:  # answers at 256 px whatever it is sent
        result = _editor(server.base_url, image_edit_model="editor-1").generate(nut, REQUEST)
    plan = plan_edit(ProceduralEngine(), nut, REQUEST)
    assert result.image.shape == nut.shape
    changed = np.abs(result.image.astype(int) - nut.astype(int)).max(axis=-1) > 0
    assert changed.any() and not (changed & ~plan.edit_mask).any()
    # The server darkened the masked area: the defect region is darker than before.
    assert result.region is not None and result.region.any()
    assert result.image[result.region].mean() < nut[result.region].mean() - 20
    assert result.info["engine"] == "endpoint" and result.info["position"] == "center"

    request = server.requests[0]
    assert request["model"] == "editor-1" and "response_format" not in request
    assert "color defect" in request["prompt"] and REQUEST.prompt in request["prompt"]
    image = Image.open(io.BytesIO(request["image"]))
    mask = Image.open(io.BytesIO(request["mask"]))
    assert image.size == mask.size and request["size"] == f"{image.size[0]}x{image.size[1]}"
    assert request["size"] in {"1024x1024", "1536x1024", "1024x1536"} and mask.mode == "RGBA"
    alpha = np.asarray(mask)[..., 3]
    # OpenAI's convention: transparent = edit; the edit area is the planned mask, the rest opaque.
    assert (alpha == 0).any() and (alpha == 255).any() and set(np.unique(alpha)) <= {0, 255}


def test_server_errors_are_retried_then_succeed(nut):
    with ImageEditServer([{"status": 503}, {}]) as server:
        result = _editor(server.base_url).generate(nut, REQUEST)
    assert len(server.requests) == 2 and result.region.any()


def test_dead_endpoint_is_one_clear_line():
    with ImageEditServer() as server:
        url = server.base_url
    editor = _editor(url, max_retries=1)
    with pytest.raises(ImageEditEndpointError, match=r"unreachable \(.*\) after 2 tries") as error:
        editor.generate(np.full((64, 64, 3), 128, np.uint8), REQUEST)
    assert "\n" not in str(error.value) and "image_edit_base_url" in str(error.value)


def test_slow_endpoint_times_out_with_a_clear_error(nut):
    # The answer comes long after the client's timeout, however loaded the machine: only the timeout can end it.
    with ImageEditServer([{"sleep": 60.0}]) as server:
        editor = _editor(server.base_url, request_timeout_s=0.3, max_retries=0)
        with pytest.raises(ImageEditEndpointError, match="timed out"):
            editor.generate(nut, REQUEST)
    assert len(server.requests) == 1  # max_retries 0: given up after the one request, not waited out


def test_refused_request_is_not_retried(nut):
    with ImageEditServer([{"status": 400}]) as server:
        with pytest.raises(ImageEditEndpointError, match="HTTP 400"):
            _editor(server.base_url).generate(nut, REQUEST)
    assert len(server.requests) == 1


def test_endpoint_backend_needs_its_url():
    with pytest.raises(ConfigurationError, match="image_edit_base_url"):
        get_toolbox(Configuration.load(overrides={"image_backend": "endpoint"}))


def test_graph_runs_end_to_end_with_the_endpoint_backend(sample_dir, tmp_path):
    from graph.graph import build_graph, recursion_limit
    from tools.imaging import load_mask

    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    with ImageEditServer() as server:
        configurable = {"image_backend": "endpoint", "image_edit_base_url": server.base_url, "image_edit_size": 128}
        state = build_graph().invoke(
            {"image": str(image), "category": "metal_nut", "anomaly_type": "color", "seed": 2,
             "run_dir": str(tmp_path / "run")},
            {"configurable": configurable, "recursion_limit": recursion_limit(Configuration.load(overrides=configurable))},
        )
    result = state["result"]
    assert state["status"] in ("success", "budget_exhausted") and server.requests
    anomaly, mask = load_image(result["anomaly_path"]), load_mask(result["mask_path"])
    assert anomaly.shape == load_image(image).shape and mask.any()
    assert result["mask_iou"] > 0.5  # the change mask agrees with the region the backend reported


def test_dead_endpoint_ends_runs_as_backend_error_and_resume_finishes_them(sample_dir, tmp_path):
    from graph.batch import list_images, plan, run_batch

    root = tmp_path / "out"
    samples = plan(list_images(sample_dir / "metal_nut")[:1], "metal_nut", ["color"], 2, root, seed=0)
    with ImageEditServer() as server:
        url = server.base_url
    overrides = {"image_backend": "endpoint", "image_edit_base_url": url, "image_edit_size": 128, "max_retries": 0,
                 "request_timeout_s": 2}
    dead = run_batch(samples, root, overrides=overrides, progress=False)
    assert dead["statuses"] == {"backend_error": 2}, dead["statuses"]
    assert not list((root / "metal_nut" / "test").rglob("*.png")), "no image was made, none may be written"

    port = int(url.split(":")[-1].split("/")[0])
    with ImageEditServer(port=port) as server:  # the endpoint is back, at the same address
        assert server.base_url == url
        resumed = run_batch(samples, root, overrides=overrides, resume=True, progress=False)
    assert set(resumed["statuses"]) <= {"success", "budget_exhausted"} and resumed["samples"] == 2
    assert len(list((root / "metal_nut" / "test").rglob("*.png"))) == 2


def test_a_wide_window_goes_at_the_nearest_supported_size_and_comes_back_at_its_own(nut):
    strip = np.ascontiguousarray(nut[52:76])  # 24 x 128 px: any window in it is wide
    plan = plan_edit(ProceduralEngine(), strip, REQUEST)
    x0, y0, x1, y1 = plan.window
    assert (x1 - x0) / (y1 - y0) > 1.3
    with ImageEditServer() as server:  # strict: GPT image sizes only, no response_format
        result = _editor(server.base_url).generate(strip, REQUEST)
    assert server.requests[0]["size"] == "1536x1024" and "response_format" not in server.requests[0]
    assert Image.open(io.BytesIO(server.requests[0]["image"])).size == (1536, 1024)
    assert result.image.shape == strip.shape and result.info["model_size"] == [1536, 1024]
    changed = np.abs(result.image.astype(int) - strip.astype(int)).max(axis=-1) > 0
    assert changed.any() and not (changed & ~plan.edit_mask).any()


def test_nearest_size_follows_the_aspect_ratio():
    sizes = ((1024, 1024), (1536, 1024), (1024, 1536))
    assert nearest_size((300, 280), sizes) == (1024, 1024)
    assert nearest_size((400, 250), sizes) == (1536, 1024)
    assert nearest_size((90, 200), sizes) == (1024, 1536)


def test_response_format_is_sent_only_when_configured_and_a_strict_server_refuses_it(nut):
    with ImageEditServer(accepts_response_format=True) as server:
        _editor(server.base_url, image_edit_response_format="b64_json").generate(nut, REQUEST)
    assert server.requests[0]["response_format"] == "b64_json"
    with ImageEditServer() as server:
        with pytest.raises(ImageEditEndpointError, match="Unknown parameter: 'response_format'"):
            _editor(server.base_url, image_edit_response_format="b64_json").generate(nut, REQUEST)
    assert len(server.requests) == 1, "a 400 is not retried"


def test_sizes_any_sends_the_windows_own_aspect_to_a_tolerant_server(nut):
    with ImageEditServer(sizes=None) as server:
        _editor(server.base_url, image_edit_sizes="any").generate(nut, REQUEST)
    width, height = (int(side) for side in server.requests[0]["size"].split("x"))
    assert max(width, height) == 128 and width % 16 == 0 and height % 16 == 0


def test_malformed_sizes_are_one_configuration_error():
    with pytest.raises(ConfigurationError, match="image_edit_sizes: '1024by768' is not WIDTHxHEIGHT"):
        get_toolbox(Configuration.load(overrides={"image_backend": "endpoint", "image_edit_base_url": "http://127.0.0.1:9/v1",
                                                  "image_edit_sizes": "1024by768"}))

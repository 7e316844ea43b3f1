"""`langgraph dev` serves the graph offline; a run over its HTTP API writes the outputs to disk."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from trace_recorder import TraceRecorder

REPO = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def traces():
    """The LangSmith endpoint the server traces to: a recorder on 127.0.0.1."""
    with TraceRecorder() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def served(tmp_path_factory, traces, sample_dir):
    """A real `langgraph dev` process on a free port, reading images under `sample_dir` (its input_root),
    writing under its own run_root and tracing to `traces`; yields (URL, run_root)."""
    tmp_path = tmp_path_factory.mktemp("served")
    port = _free_port()
    log = tmp_path / "server.log"
    env = {
        **os.environ,
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LANGGRAPH_NO_VERSION_CHECK": "true",
        "LANGSMITH_TRACING": "true",
        "LANGSMITH_ENDPOINT": traces.url,
        "LANGSMITH_API_KEY": "dummy",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ANOMALY_AGENT_RUN_ROOT": str(tmp_path / "runs"),
        "ANOMALY_AGENT_INPUT_ROOT": str(sample_dir),
        "NO_COLOR": "1",
    }
    cli = Path(sys.executable).with_name("langgraph")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(cli), "dev", "--no-browser", "--no-reload", "--port", str(port), "--config", "langgraph.json"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and url is None:
            if proc.poll() is not None:
                pytest.fail(f"langgraph dev exited early:\n{log.read_text()[-3000:]}")
            text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))  # drop colour codes
            found = re.search(r"API:\s+(http://[0-9.:a-z]+)", text)
            if found:
                candidate = found.group(1).rstrip("/")
                try:
                    if httpx.get(candidate + "/ok", timeout=2).status_code == 200:
                        url = candidate
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        if url is None:
            pytest.fail(f"langgraph dev did not become ready:\n{log.read_text()[-3000:]}")
        yield url, (tmp_path / "runs").resolve()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture()
def client(served):
    from langgraph_sdk import get_sync_client

    return get_sync_client(url=served[0])


def _inputs(sample_dir: Path, **extra) -> dict:
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    return {"image": str(image), "category": "metal_nut", "anomaly_type": "scratch", **extra}


def _error(client, sample_dir: Path, inputs: dict | None = None, **kwargs) -> str:
    """The message of a run that must fail, as the server reports it."""
    output = client.runs.wait(None, "anomaly_agent", input=_inputs(sample_dir, **(inputs or {})), raise_error=False, **kwargs)
    assert "__error__" in output, output
    return output["__error__"]["message"]


@pytest.mark.integration
def test_langgraph_dev_run_writes_outputs_to_disk(served, client, sample_dir):
    assistants = client.assistants.search(graph_id="anomaly_agent")
    assert assistants, "the server does not list the anomaly_agent graph"
    output = client.runs.wait(None, "anomaly_agent", input=_inputs(sample_dir, seed=2),
                              config={"configurable": {"return_data_urls": True}})
    assert output["status"] in ("success", "budget_exhausted"), output
    result = output["result"]
    assert Path(result["anomaly_path"]).is_file() and Path(result["mask_path"]).is_file()
    assert Path(result["anomaly_path"]).is_relative_to(served[1])
    assert result["anomaly_data_url"].startswith("data:image/png;base64,")


@pytest.mark.integration
def test_studio_sees_input_output_and_settings_schemas_with_descriptions(client):
    schemas = client.assistants.get_schemas(client.assistants.search(graph_id="anomaly_agent")[0]["assistant_id"])
    inputs, outputs, context = schemas["input_schema"], schemas["output_schema"], schemas["context_schema"]
    assert set(inputs["properties"]) == {"image", "category", "anomaly_type", "seed", "run_dir"}
    assert {"status", "result", "messages"} <= set(outputs["properties"])
    assert {"max_steps", "policy", "image_backend", "config_file"} <= set(context["properties"])
    assert schemas["config_schema"], "no config schema: Studio shows no settings"
    for schema in (inputs, outputs, context):
        assert [k for k, v in schema["properties"].items() if not v.get("description")] == []


@pytest.mark.integration
def test_settings_come_from_the_context_or_configurable(client, sample_dir):
    by_context = client.runs.wait(None, "anomaly_agent", input=_inputs(sample_dir), context={"max_steps": 2})
    by_configurable = client.runs.wait(None, "anomaly_agent", input=_inputs(sample_dir), config={"configurable": {"max_steps": 2}})
    for output in (by_context, by_configurable):
        assert output["status"] == "budget_exhausted" and output["result"]["steps"] == 2, output


@pytest.mark.integration
@pytest.mark.parametrize("channel", ["configurable", "context"])
def test_a_misspelled_setting_fails_the_run_naming_the_closest_one(client, sample_dir, channel):
    settings = {"max_step": 2}
    where = {"context": settings} if channel == "context" else {"config": {"configurable": settings}}
    message = _error(client, sample_dir, **where)
    assert "unknown setting 'max_step' (did you mean 'max_steps'?)" in message


@pytest.mark.integration
def test_a_run_dir_out_of_run_root_is_refused_and_nothing_is_written(served, client, sample_dir, tmp_path):
    _, root = served
    (root / "link").parent.mkdir(parents=True, exist_ok=True)
    if not (root / "link").is_symlink():
        (root / "link").symlink_to(tmp_path)
    for run_dir in ("../../etc/passwd", str(tmp_path / "abs"), "link/x"):
        message = _error(client, sample_dir, {"run_dir": run_dir})
        assert "input 'run_dir'" in message, message
    assert list(tmp_path.iterdir()) == []
    output = client.runs.wait(None, "anomaly_agent", input=_inputs(sample_dir, run_dir="team/a"))
    assert Path(output["result"]["anomaly_path"]).parent == root / "team" / "a"


@pytest.mark.integration
def test_an_image_path_out_of_input_root_is_refused_and_one_inside_is_read(served, client, sample_dir, tmp_path):
    image = Path(_inputs(sample_dir)["image"])
    secret = tmp_path / "secret.png"
    secret.write_bytes(image.read_bytes())
    links = sample_dir / "served-links"
    links.mkdir(exist_ok=True)
    if not (links / "out.png").is_symlink():
        (links / "out.png").symlink_to(secret)
    for path in ("/etc/passwd", str(secret), "../" + secret.name, "served-links/out.png"):
        message = _error(client, sample_dir, {"image": path})
        assert "input 'image'" in message and "input_root" in message, message
    for path in (str(image), str(image.relative_to(sample_dir))):
        output = client.runs.wait(None, "anomaly_agent", input=_inputs(sample_dir, image=path))
        assert output["status"] in ("success", "budget_exhausted"), output


@pytest.mark.integration
def test_a_run_may_not_move_run_root(client, sample_dir, tmp_path):
    message = _error(client, sample_dir, context={"run_root": str(tmp_path)})
    assert "setting 'run_root' belongs to the server's configuration" in message


@pytest.mark.integration
def test_bad_seed_and_unwritable_run_dir_name_the_field(served, client, sample_dir):
    assert "input 'seed' must be an integer, not 'abc'" in _error(client, sample_dir, {"seed": "abc"})
    (served[1] / "a-file").write_text("not a folder")
    message = _error(client, sample_dir, {"run_dir": "a-file/run"})
    assert "input 'run_dir': cannot write to" in message, message


@pytest.mark.integration
def test_a_served_run_with_a_data_url_is_traced_by_its_task_without_pixels(client, traces, sample_dir):
    from tools.imaging import encode_data_url, load_image

    image = encode_data_url(load_image(_inputs(sample_dir)["image"]))
    thread = client.threads.create()
    output = client.runs.wait(thread["thread_id"], "anomaly_agent", input=_inputs(sample_dir, image=image, anomaly_type="color"))
    assert output["status"] in ("success", "budget_exhausted"), output
    state = client.threads.get_state(thread["thread_id"])
    assert "base64," not in json.dumps(state["values"])  # the image is kept once, in the run's image store
    deadline = time.monotonic() + 60  # the server sends traces in the background
    while time.monotonic() < deadline:
        roots = [r for r in traces.runs().values() if r.get("name") == "anomaly-agent metal_nut/color" and r.get("end_time")]
        if roots:
            break
        time.sleep(0.2)
    assert roots, "no finished trace named after the task"
    assert roots[0]["extra"]["metadata"]["anomaly_type"] == "color"
    children = [r for r in traces.runs().values() if r.get("trace_id") == roots[0].get("trace_id")]
    assert {"tool"} <= {r.get("run_type") for r in children}
    assert not any(b"base64," in body for body in traces.raw)

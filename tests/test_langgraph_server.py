"""`langgraph dev` serves the graph offline; a run over its HTTP API writes the outputs to disk."""

from __future__ import annotations

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

REPO = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    """A real `langgraph dev` process on a free port; yields its base URL."""
    port = _free_port()
    log = tmp_path / "server.log"
    env = {
        **os.environ,
        "LANGGRAPH_CLI_NO_ANALYTICS": "1",
        "LANGGRAPH_NO_VERSION_CHECK": "true",
        "LANGSMITH_TRACING": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ANOMALY_AGENT_RUN_ROOT": str(tmp_path / "runs"),
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
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.integration
def test_langgraph_dev_run_writes_outputs_to_disk(server, sample_dir, tmp_path):
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server)
    assistants = client.assistants.search(graph_id="anomaly_agent")
    assert assistants, "the server does not list the anomaly_agent graph"
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    output = client.runs.wait(
        None,
        "anomaly_agent",
        input={"image": str(image), "category": "metal_nut", "anomaly_type": "scratch", "seed": 2},
        config={"configurable": {"return_data_urls": True}},
    )
    assert output["status"] in ("success", "budget_exhausted"), output
    result = output["result"]
    assert Path(result["anomaly_path"]).is_file() and Path(result["mask_path"]).is_file()
    assert Path(result["anomaly_path"]).is_relative_to(tmp_path / "runs")
    assert result["anomaly_data_url"].startswith("data:image/png;base64,")

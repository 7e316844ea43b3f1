"""`trajectories export --langgraph-url`: runs made through the SDK on a real `langgraph dev` server become the
same trajectory records a batch root gives, and `train sft`'s loader reads them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from test_langgraph_server import served, traces  # noqa: F401  (the real `langgraph dev` fixture)

from tools.imaging import load_image, load_mask
from training.trajectories import normalise_record

TASKS = [("tile", "crack", 1), ("metal_nut", "scratch", 2)]


@pytest.fixture()
def server(served):  # noqa: F811
    """The URL of the real `langgraph dev` server."""
    return served[0]


def _export(*args: str) -> subprocess.CompletedProcess:
    cli = str(Path(sys.executable).with_name("anomaly-agent"))
    return subprocess.run([cli, "trajectories", "export", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_served_runs_export_as_batch_records_that_sft_loads(server, sample_dir, tmp_path):  # noqa: F811
    from langgraph_sdk import get_sync_client

    from training.sft import load_training_dataset

    client = get_sync_client(url=server)
    since = datetime.now(timezone.utc).isoformat()  # the server keeps earlier threads (.langgraph_api/)
    finals = {}
    for category, anomaly_type, seed in TASKS:
        thread = client.threads.create()
        image = sorted((sample_dir / category).glob("*.png"))[0]
        output = client.runs.wait(thread["thread_id"], "anomaly_agent",
                                  input={"image": str(image), "category": category, "anomaly_type": anomaly_type, "seed": seed},
                                  config={"configurable": {"return_data_urls": True}})
        finals[thread["thread_id"]] = output["result"]

    out = tmp_path / "served.jsonl"
    done = _export("--langgraph-url", server, "--since", since, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["kept"] == len(TASKS)
    records = {r["thread_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records.keys() == finals.keys()
    for thread_id, record in records.items():
        # the record the server's own run wrote to its run store, as a batch root's export reads it
        written = normalise_record(json.loads(Path(finals[thread_id]["trajectory_path"]).read_text()))
        assert Path(record["final_image"]).is_file() and Path(record["images"]["1"]).is_file()
        for key in written.keys() - {"created", "final"}:
            assert record[key] == written[key], key
        assert {k: v for k, v in record["final"].items() if k != "trajectory_path"} == written["final"]

    dataset = load_training_dataset(out, shuffle=False)
    assert len(dataset) == len(TASKS) and {"messages", "tools"} <= set(dataset.column_names)
    assert any(m["tool_calls"] for m in dataset[0]["messages"])

    assert "no trajectory to export" in _export("--langgraph-url", server, "--since", "2999-01-01", "--out", str(tmp_path / "none.jsonl")).stderr


@pytest.mark.integration
def test_served_images_off_this_machine_come_from_the_runs_data_urls(server, sample_dir, tmp_path):  # noqa: F811
    from langgraph_sdk import get_sync_client

    client = get_sync_client(url=server)
    since = datetime.now(timezone.utc).isoformat()
    thread = client.threads.create()
    image = sorted((sample_dir / "tile").glob("*.png"))[0]
    result = client.runs.wait(thread["thread_id"], "anomaly_agent", input={"image": str(image), "category": "tile", "anomaly_type": "oil", "seed": 4},
                              config={"configurable": {"return_data_urls": True}})["result"]
    anomaly, mask = load_image(result["anomaly_path"]), load_mask(result["mask_path"])
    shutil.rmtree(result["run_dir"])  # as if the server's run store were on another machine

    out = tmp_path / "served.jsonl"
    done = _export("--langgraph-url", server, "--since", since, "--out", str(out))
    assert done.returncode == 0, done.stderr
    [record] = map(json.loads, out.read_text().splitlines())
    assert Path(record["final_image"]) == tmp_path / "served_images" / thread["thread_id"] / "anomaly.png"
    assert np.array_equal(load_image(record["final_image"]), anomaly)
    assert np.array_equal(load_mask(record["final_mask"]), mask)

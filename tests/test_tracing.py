"""LangSmith traces, decoded by a local recorder: named runs, tool and llm runs, metadata, no pixels.

Each traced run is a subprocess (the LangSmith client is per process and sends its last batches at
exit), pointed at a `TraceRecorder` on 127.0.0.1: no network.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chat_server import ScriptedChatServer
from trace_recorder import TraceRecorder

from graph.tracing import TRACED_MESSAGES, TRANSPORT_RETRIES, BoundedSession, scrub, tracing_client

REPO = Path(__file__).parents[1]
TOOLS = {"prompt_gen", "image_gen", "quality_eval", "knowledge_retrieval", "mask_gen"}

DRIVER = """
import json, sys
from graph.graph import build_graph
from tools.imaging import encode_data_url, load_image
image, run_dir, configurable = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
inputs = {"image": encode_data_url(load_image(image)), "category": "metal_nut", "anomaly_type": "scratch",
          "seed": 3, "run_dir": run_dir}
out = build_graph().invoke(inputs, {"configurable": configurable, "recursion_limit": 40})
print(json.dumps({"status": out["status"]}))
"""


def _traced_run(recorder: TraceRecorder, sample_dir: Path, tmp_path: Path, **configurable) -> dict:
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    env = {**os.environ, "LANGSMITH_TRACING": "true", "LANGSMITH_ENDPOINT": recorder.url, "LANGSMITH_API_KEY": "dummy",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(image), str(tmp_path / "run"), json.dumps(configurable)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scripted_trace(sample_dir, tmp_path_factory):
    with TraceRecorder() as recorder:
        out = _traced_run(recorder, sample_dir, tmp_path_factory.mktemp("traced"))
    return out, recorder


def test_the_graph_run_is_named_after_its_task_with_tags_and_metadata(scripted_trace):
    out, recorder = scripted_trace
    assert out["status"] in ("success", "budget_exhausted")
    roots = [r for r in recorder.runs().values() if not r.get("parent_run_id")]
    assert [r["name"] for r in roots] == ["anomaly-agent metal_nut/scratch"]
    metadata = roots[0]["extra"]["metadata"]
    assert {k: metadata[k] for k in ("category", "anomaly_type", "seed", "policy", "model")} == {
        "category": "metal_nut", "anomaly_type": "scratch", "seed": 3, "policy": "scripted", "model": None}
    assert metadata["backends"] == {"prompt": "template", "image": "procedural", "judge": "metric",
                                    "knowledge": "chroma", "mask": "change"}
    assert {"category:metal_nut", "anomaly_type:scratch", "policy:scripted"} <= set(roots[0]["tags"])


def test_each_tool_call_is_a_tool_run_with_the_tasks_metadata(scripted_trace):
    _, recorder = scripted_trace
    tools = [r for r in recorder.runs().values() if r.get("run_type") == "tool"]
    assert {r["name"] for r in tools} <= TOOLS and {"image_gen", "mask_gen"} <= {r["name"] for r in tools}
    assert all(r["extra"]["metadata"]["anomaly_type"] == "scratch" and r.get("outputs") for r in tools)


def test_no_pixels_reach_the_traces_and_node_inputs_keep_only_the_latest_messages(scripted_trace):
    _, recorder = scripted_trace
    assert recorder.requests > 0
    assert not any(b"base64," in body or b"iVBORw0KGgo" in body for body in recorder.raw)  # iVBORw0KGgo: a PNG in base64
    nodes = [r for r in recorder.runs().values() if r.get("name") == "policy" and r.get("inputs")]
    assert nodes and all(len(r["inputs"].get("messages", [])) <= TRACED_MESSAGES for r in nodes)
    assert max(r["inputs"].get("earlier_messages", 0) for r in nodes) > 0


def test_a_policy_that_asks_a_model_is_traced_as_an_llm_run(sample_dir, tmp_path):
    with ScriptedChatServer([{"content": "No tool needed."}], model="tiny-vlm") as chat, TraceRecorder() as recorder:
        out = _traced_run(recorder, sample_dir, tmp_path, policy="openai", base_url=chat.base_url, model="tiny-vlm",
                          max_retries=0)
    assert out["status"] == "failed"  # the model answered without a call: no image
    llm = [r for r in recorder.runs().values() if r.get("run_type") == "llm"]
    assert len(llm) == 1 and llm[0]["extra"]["metadata"]["ls_model_name"] == "tiny-vlm"
    assert llm[0]["extra"]["metadata"]["policy"] == "openai" and "No tool needed." in json.dumps(llm[0]["outputs"])


def test_a_failing_endpoint_gets_each_batch_without_transport_retries(sample_dir, tmp_path):
    with TraceRecorder(status=503) as recorder:
        out = _traced_run(recorder, sample_dir, tmp_path)
    assert out["status"] in ("success", "budget_exhausted")  # tracing failures never fail a run
    sends = collections.Counter(hashlib.sha1(body).hexdigest() for body in recorder.raw)
    # LangSmith's client tries a batch up to 3 times; its default transport retried each try 3 more
    # times with back-off (the seconds a dead endpoint added at exit). Ours sends each try once.
    assert sends and max(sends.values()) <= 3


def test_the_tracing_client_caps_timeouts_and_does_not_retry_sends():
    client = tracing_client()
    assert isinstance(client.session, BoundedSession)
    assert client.session.get_adapter(client.api_url).max_retries.total == TRANSPORT_RETRIES == 0


def test_scrub_replaces_data_urls_and_long_base64_keeping_the_rest():
    url = "data:image/png;base64," + "iVBORw0KGgo" * 100
    scrubbed = scrub({"image": url, "note": f"see {url} here", "n": 3, "blob": "A" * 600})
    assert scrubbed == {"image": f"<data URL, {len(url)} chars>", "note": f"see <data URL, {len(url)} chars> here",
                        "n": 3, "blob": "<base64, 600 chars>"}


def test_a_data_url_input_is_stored_once_and_the_state_refers_to_its_file(sample_dir, tmp_path):
    from langgraph.checkpoint.memory import InMemorySaver

    from graph.graph import build_graph
    from tools.imaging import encode_data_url, load_image

    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    agent = build_graph(checkpointer=InMemorySaver())
    thread = {"configurable": {"thread_id": "t"}, "recursion_limit": 40}
    url = encode_data_url(load_image(image))
    agent.invoke({"image": url, "category": "metal_nut", "anomaly_type": "scratch", "run_dir": str(tmp_path / "run")}, thread)
    history = list(agent.get_state_history(thread))
    holding = [s.metadata["step"] for s in history if "base64," in json.dumps(s.values, default=str)]
    assert holding == [0]  # only the input, as given; from the first node on, the state holds the file's path
    final = history[0].values
    assert Path(final["image"]).is_file() and Path(final["image"]).is_relative_to(tmp_path / "run")
    assert (load_image(final["image"]) == load_image(url)).all()

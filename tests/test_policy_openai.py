"""The openai policy against real HTTP servers that misbehave: every run ends, within budget, and says why."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from chat_server import ScriptedChatServer, native_call

from anomaly_agent_cli import main
from graph.configuration import Configuration
from graph.graph import build_graph, recursion_limit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

IMAGE_GEN = '{"name": "image_gen", "arguments": {"prompt": "Add one small dark crack", "image": 1}}'


def _run(base_url: str, sample_dir: Path, tmp_path: Path, **extra) -> dict:
    overrides = {"policy": "openai", "base_url": base_url, "max_steps": 4, "max_retries": 1, **extra}
    cfg = Configuration.load(overrides=overrides)
    return build_graph().invoke(
        {"image": str(sample_dir / "tile" / "000.png"), "category": "tile", "anomaly_type": "crack",
         "run_dir": str(tmp_path / "run")},
        {"configurable": overrides, "recursion_limit": recursion_limit(cfg)},
    )


def _errors(out: dict) -> list[str]:
    return [m.content for m in out["messages"] if m.type == "tool" and m.content.startswith("Error:")]


@pytest.mark.parametrize(
    ("name", "step", "error"),
    [
        ("garbage", {"content": "<tool_call>}}}{{ ??? \x00 garbage"}, "could not parse the tool call: the tool call is not valid JSON"),
        ("unknown tool", {"content": '<tool_call>{"name": "paint", "arguments": {}}</tool_call>'}, "unknown tool 'paint'"),
        ("bad JSON arguments", {"content": None, "tool_calls": [native_call("image_gen", '{"prompt": ')]},
         "could not parse the tool call: arguments are not valid JSON"),
        ("arguments not matching the schema", {"content": '<tool_call>{"name": "quality_eval", "arguments": {"image": "x"}}</tool_call>'},
         "invalid arguments for quality_eval: 'image'"),
    ],
)
def test_malformed_calls_become_error_observations_until_the_budget_ends(name, step, error, sample_dir, tmp_path):
    with ScriptedChatServer([step]) as server:
        out = _run(server.base_url, sample_dir, tmp_path)
    assert out["status"] == "failed", name
    assert out["result"]["steps"] == 4 and len(server.requests) == 4
    errors = _errors(out)
    assert len(errors) == 4 and all(error in e for e in errors), errors
    # The model is shown its bad call and the error, as a call with an answer (a valid conversation).
    last = server.requests[-1]["messages"]
    assert last[-1]["role"] == "tool" and last[-2]["tool_calls"]


def test_reply_without_a_call_ends_the_run_at_once(sample_dir, tmp_path):
    with ScriptedChatServer([{"content": "I would add a crack somewhere."}]) as server:
        out = _run(server.base_url, sample_dir, tmp_path)
    assert out["status"] == "failed" and out["result"]["steps"] == 0
    assert len(server.requests) == 1


def test_request_carries_tools_sampling_settings_and_the_stop_at_the_call(sample_dir, tmp_path):
    with ScriptedChatServer([{"content": "done"}]) as server:
        _run(server.base_url, sample_dir, tmp_path, temperature=0.5, max_tokens=77)
    (request,) = server.requests
    assert [t["function"]["name"] for t in request["tools"]][0] == "prompt_gen"
    assert request["temperature"] == 0.5 and request["max_tokens"] == 77 and request["stop"] == ["</tool_call>"]
    assert request["model"] == "scripted"  # no model given: the server's first one
    assert isinstance(request["seed"], int)


def test_a_good_run_over_http_succeeds(sample_dir, tmp_path):
    script = [
        {"content": '<tool_call>{"name": "prompt_gen", "arguments": {}}</tool_call>'},
        {"content": f"<tool_call>{IMAGE_GEN}</tool_call>"},
        {"content": None, "tool_calls": [native_call("quality_eval", '{"image": 2}')]},
        {"content": '{"name": "mask_gen", "arguments": {"image": 2}}'},
        {"content": "Image 2 has the defect and its mask."},
    ]
    with ScriptedChatServer(script) as server:
        out = _run(server.base_url, sample_dir, tmp_path, max_steps=6)
    assert not _errors(out)
    assert out["result"]["mask_by"] == "policy" and out["result"]["steps"] == 4
    assert out["status"] in {"success", "incomplete"}  # incomplete only if QE failed image 2


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_dead_endpoint_ends_the_run_with_a_policy_error(sample_dir, tmp_path):
    url = _closed_port_url()
    out = _run(url, sample_dir, tmp_path, model="m")
    assert out["status"] == "policy_error"
    error = out["result"]["error"]
    assert error.startswith(f"policy endpoint {url} unreachable after 2 tries:") and "\n" not in error
    record = json.loads(Path(out["result"]["trajectory_path"]).read_text())
    assert record["status"] == "policy_error" and record["final"]["error"] == error


def test_slow_endpoint_times_out_into_a_policy_error(sample_dir, tmp_path):
    with ScriptedChatServer([{"sleep": 60, "content": "late"}]) as server:  # never in time, however loaded
        out = _run(server.base_url, sample_dir, tmp_path, model="m", request_timeout_s=0.5)
    assert out["status"] == "policy_error"
    assert "timed out after 2 tries" in out["result"]["error"]


def test_endpoint_answering_500_ends_in_a_policy_error_after_retries(sample_dir, tmp_path):
    with ScriptedChatServer([{"status": 500}]) as server:
        out = _run(server.base_url, sample_dir, tmp_path, model="m")
    assert out["status"] == "policy_error" and len(server.requests) == 2
    assert "answered HTTP 500 after 2 tries" in out["result"]["error"]


def test_policy_error_mid_run_keeps_the_best_image(sample_dir, tmp_path):
    script = [
        {"content": f"<tool_call>{IMAGE_GEN}</tool_call>"},
        {"status": 503},
    ]
    with ScriptedChatServer(script) as server:
        out = _run(server.base_url, sample_dir, tmp_path, model="m")
    assert out["status"] == "policy_error"
    assert out["result"]["image"] == 2 and Path(out["result"]["mask_path"]).is_file()


def test_cli_synthesize_against_a_dead_endpoint_stops_before_running(sample_dir, tmp_path, capsys):
    url = _closed_port_url()
    code = main(["synthesize", "--image", str(sample_dir / "tile" / "000.png"), "--category", "tile",
                 "--anomaly-type", "crack", "--out", str(tmp_path / "out"), "--policy", "openai", "--base-url", url,
                 "--model", "m"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip().startswith(f"anomaly-agent: error: policy endpoint {url} unreachable after 3 tries:")
    assert len(captured.err.strip().splitlines()) == 1


def test_cli_synthesize_whose_endpoint_fails_mid_run_exits_1_with_the_reason(sample_dir, tmp_path, capsys):
    with ScriptedChatServer([{"status": 500}]) as server:
        code = main(["synthesize", "--image", str(sample_dir / "tile" / "000.png"), "--category", "tile",
                     "--anomaly-type", "crack", "--out", str(tmp_path / "out"), "--policy", "openai",
                     "--base-url", server.base_url, "--config", str(_fast_retries(tmp_path))])
    captured = capsys.readouterr()
    assert code == 1
    assert json.loads(captured.out)["status"] == "policy_error"
    assert "answered HTTP 500 after 1 try" in captured.err


def _fast_retries(tmp_path: Path) -> Path:
    path = tmp_path / "fast.yaml"
    path.write_text("max_retries: 0\n")
    return path


def test_cli_openai_policy_without_url_fails_before_running(sample_dir, tmp_path, capsys):
    code = main(["synthesize", "--image", str(sample_dir / "tile" / "000.png"), "--category", "tile",
                 "--anomaly-type", "crack", "--out", str(tmp_path / "out"), "--policy", "openai"])
    assert code == 2 and "--base-url" in capsys.readouterr().err

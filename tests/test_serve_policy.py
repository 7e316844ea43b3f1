"""`anomaly-agent serve-policy` as a real subprocess on a free port, and the openai policy against it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from served_policy import Served
from tiny_llm import build_tiny_llm

from graph.configuration import Configuration
from graph.graph import build_graph, recursion_limit
from graph.inference.hermes import parse_completion
from graph.inference import load_local_model
from graph.tool_calls import tool_schemas

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPLY = '<tool_call>\n{"name": "prompt_gen", "arguments": {"feedback": ""}}\n</tool_call>'


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    served = Served(build_tiny_llm(tmp_path_factory.mktemp("random-llm")))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def aimed_server(tmp_path_factory):
    served = Served(build_tiny_llm(tmp_path_factory.mktemp("aimed-llm"), fixed_reply=REPLY))
    yield served
    served.stop()


def _chat(server: Served, timeout: float = 60, **body) -> httpx.Response:
    body.setdefault("messages", [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=timeout)


def test_models_lists_the_served_model(random_server):
    data = httpx.get(f"{random_server.base_url}/models", timeout=10).json()["data"]
    assert [m["id"] for m in data] == [random_server.model.name]


def test_completion_returns_token_ids_and_logprobs_on_request(random_server):
    body = _chat(random_server, tools=tool_schemas(), temperature=0, max_tokens=6, logprobs=True,
                 return_token_ids=True).json()
    (choice,) = body["choices"]
    assert len(choice["token_ids"]) == len(choice["logprobs"]["content"]) <= 6
    assert all(t["logprob"] <= 0 for t in choice["logprobs"]["content"])
    assert body["prompt_token_ids"] and body["usage"]["prompt_tokens"] == len(body["prompt_token_ids"])
    assert isinstance(choice["raw_text"], str)


def test_completion_without_extras_has_no_token_fields_and_n_gives_n_choices(random_server):
    body = _chat(random_server, max_tokens=4, n=2, temperature=1.0, seed=3).json()
    assert len(body["choices"]) == 2
    assert "token_ids" not in body["choices"][0] and "prompt_token_ids" not in body


def test_bad_requests_are_answered_400_with_a_message(random_server):
    assert _chat(random_server, stream=True).status_code == 400
    response = httpx.post(f"{random_server.base_url}/chat/completions", content=b"{nope", timeout=10)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert "messages" in _chat(random_server, messages=[]).json()["error"]["message"]


def test_a_request_its_client_gave_up_on_is_cancelled_and_frees_the_model(random_server):
    with pytest.raises(httpx.TimeoutException):
        _chat(random_server, timeout=1.0, max_tokens=6000, temperature=0)  # minutes of work if not cancelled
    assert _chat(random_server, max_tokens=2, temperature=0).status_code == 200
    # The abandoned generation was stopped, not run to its 6000 tokens (a wall-clock bound would hang on load).
    deadline = time.monotonic() + 60
    while "generation cancelled" not in random_server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "client disconnected; generation cancelled" in random_server.log()


def test_served_and_in_process_generation_agree(random_server):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Add a scratch to <image 1>."}]
    served = _chat(random_server, messages=messages, tools=tool_schemas(), temperature=0, max_tokens=10,
                   return_token_ids=True).json()["choices"][0]
    local = load_local_model(random_server.model).generate(messages, tools=tool_schemas(), max_new_tokens=10)
    assert served["token_ids"] == local.token_ids and served["raw_text"] == local.text


def test_a_generated_call_is_returned_as_native_tool_calls(aimed_server):
    choice = _chat(aimed_server, tools=tool_schemas(), temperature=0, max_tokens=8).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "prompt_gen", "arguments": '{"feedback": ""}'}
    assert choice["raw_text"] == REPLY
    assert not parse_completion(choice["message"]["content"], choice["message"]["tool_calls"]).invalid_tool_calls


def _run(server: Served, sample_dir: Path, tmp_path: Path, **extra) -> dict:
    overrides = {"policy": "openai", "base_url": server.base_url, "max_steps": 3, "max_tokens": 12, **extra}
    cfg = Configuration.load(overrides=overrides)
    return build_graph().invoke(
        {"image": str(sample_dir / "tile" / "000.png"), "category": "tile", "anomaly_type": "crack",
         "run_dir": str(tmp_path / "run")},
        {"configurable": overrides, "recursion_limit": recursion_limit(cfg)},
    )


def test_openai_policy_over_a_random_served_model_ends_within_budget(random_server, sample_dir, tmp_path):
    out = _run(random_server, sample_dir, tmp_path)
    assert out["status"] in {"failed", "incomplete", "budget_exhausted"}
    assert out["result"]["steps"] <= 3


def test_openai_policy_runs_the_tool_the_served_model_calls(aimed_server, sample_dir, tmp_path):
    out = _run(aimed_server, sample_dir, tmp_path, record_token_ids=True)
    assert out["status"] == "failed"  # prompt_gen forever: no image, budget spent
    assert out["result"]["steps"] == 3
    tools_run = [m.name for m in out["messages"] if m.type == "tool"]
    assert tools_run == ["prompt_gen"] * 3
    first = next(m for m in out["messages"] if m.type == "ai")
    assert first.response_metadata["token_ids"] and first.response_metadata["prompt_token_ids"]
    assert len(first.response_metadata["logprobs"]) == len(first.response_metadata["token_ids"])

"""PG-LLM and QE-VLM over real HTTP: requests they send, answers they accept, and their fallbacks."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from chat_server import ScriptedChatServer

from graph.configuration import Configuration, ConfigurationError
from graph.graph import build_graph, recursion_limit
from graph.toolbox import get_toolbox, tool_endpoint
from tools.llm_client import ChatClient
from tools.prompt_gen_llm import LLMPromptGenerator, clean_instruction
from tools.quality_eval_vlm import VLMJudge, parse_verdict
from tools.types import EvaluationRequest, PromptRequest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

VERDICT = {"location": 4.5, "quality": 2.0, "review": "Too faint.", "fixes": [{"attribute": "contrast", "value": "high"}]}


def _images() -> tuple[np.ndarray, np.ndarray]:
    normal = np.full((48, 48, 3), 128, np.uint8)
    edited = normal.copy()
    edited[20:24, 8:40] = 30
    return normal, edited


def _client(url: str) -> ChatClient:
    return ChatClient(base_url=url, max_retries=0, timeout_s=5)


def test_pg_llm_returns_the_cleaned_instruction_and_sends_the_vocabulary():
    with ScriptedChatServer([{"content": 'Instruction: "Add one small dark crack with sharp edges in the center of the tile."'}]) as server:
        text = LLMPromptGenerator(_client(server.base_url)).generate(
            PromptRequest(category="tile", anomaly_type="crack", subject="the tile", feedback="contrast=high", seed=4)
        )
    assert text == "Add one small dark crack with sharp edges in the center of the tile."
    system, user = server.requests[0]["messages"]
    assert "scratch" in system["content"] and "top-left" in system["content"]
    assert "contrast=high" in user["content"] and server.requests[0]["seed"] == 4


def test_pg_llm_falls_back_to_the_template_when_the_answer_is_empty():
    with ScriptedChatServer([{"content": "  \n"}]) as server:
        text = LLMPromptGenerator(_client(server.base_url)).generate(PromptRequest(category="tile", anomaly_type="crack"))
    assert text.startswith("Add ") and len(server.requests) == 2


def test_clean_instruction_drops_labels_and_markdown():
    assert clean_instruction("\n- **\n1. Add a tiny stain.\nmore") == "Add a tiny stain."
    assert clean_instruction("") == ""


def test_vlm_judge_sends_both_images_and_applies_the_thresholds():
    normal, edited = _images()
    with ScriptedChatServer([{"content": "```json\n" + json.dumps(VERDICT) + "\n```"}]) as server:
        evaluation = VLMJudge(_client(server.base_url), pass_quality=3.0).evaluate(
            normal, edited, EvaluationRequest(category="tile", anomaly_type="crack", prompt="Add a crack"))
    assert (evaluation.location, evaluation.quality, evaluation.passed, evaluation.judge) == (4.5, 2.0, False, "vlm")
    assert evaluation.review == "Too faint. Fixes: contrast=high"
    images = [p for p in server.requests[0]["messages"][1]["content"] if p["type"] == "image_url"]
    assert len(images) == 2 and all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in images)


def test_vlm_judge_retries_an_invalid_verdict_with_the_reason():
    normal, edited = _images()
    script = [{"content": '{"location": 9, "quality": 1, "review": "x"}'}, {"content": json.dumps(VERDICT)}]
    with ScriptedChatServer(script) as server:
        evaluation = VLMJudge(_client(server.base_url)).evaluate(normal, edited, EvaluationRequest(category="tile", anomaly_type="crack"))
    assert evaluation.judge == "vlm" and evaluation.details["vlm_attempts"] == 2
    assert "field 'location'" in server.requests[1]["messages"][-1]["content"]


def test_vlm_judge_falls_back_to_the_metric_judge_and_says_so():
    normal, edited = _images()
    with ScriptedChatServer([{"content": "looks fine to me"}]) as server:
        evaluation = VLMJudge(_client(server.base_url), attempts=2).evaluate(
            normal, edited, EvaluationRequest(category="tile", anomaly_type="crack"))
    assert evaluation.judge == "metric-fallback" and len(server.requests) == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    assert VLMJudge(ChatClient(base_url=dead, model="m", max_retries=0)).evaluate(
        normal, edited, EvaluationRequest(category="tile", anomaly_type="crack")).judge == "metric-fallback"


def test_parse_verdict_names_what_is_wrong():
    with pytest.raises(ValueError, match="no JSON object"):
        parse_verdict("nothing here")
    with pytest.raises(ValueError, match="field 'review'"):
        parse_verdict('{"location": 1, "quality": 1}')


def test_tool_endpoints_default_to_the_policy_endpoint_and_need_one():
    cfg = Configuration(policy="openai", base_url="http://h/v1", model="pol", judge_backend="vlm", judge_model="vlm")
    assert tool_endpoint(cfg, "judge")[:2] == ("http://h/v1", "vlm")
    assert tool_endpoint(cfg, "prompt")[:2] == ("http://h/v1", "pol")
    own = Configuration(prompt_backend="llm", prompt_base_url="http://p/v1")
    assert tool_endpoint(own, "prompt")[:2] == ("http://p/v1", None)
    with pytest.raises(ConfigurationError, match="prompt_base_url"):
        get_toolbox(Configuration(prompt_backend="llm"))


def test_the_toolbox_is_kept_across_policy_settings_and_rebuilt_when_a_tool_section_changes():
    base = Configuration(judge_backend="vlm", judge_base_url="http://j/v1")
    assert get_toolbox(base) is get_toolbox(Configuration(**{**base.flat(), "temperature": 0.9, "max_steps": 4}))
    stricter = get_toolbox(Configuration(**{**base.flat(), "pass_quality": 4.0}))
    assert stricter is not get_toolbox(base) and stricter.judge.pass_quality == 4.0


def test_graph_run_with_llm_pg_and_vlm_judge(sample_dir, tmp_path):
    script = [{"content": "Add one medium dark crack with sharp edges, high contrast, in the center of the tile."},
              {"content": json.dumps({**VERDICT, "quality": 4.0})}]
    with ScriptedChatServer(script) as server:
        overrides = {"prompt_backend": "llm", "judge_backend": "vlm", "base_url": server.base_url}
        cfg = Configuration.load(overrides=overrides)
        out = build_graph().invoke(
            {"image": str(sample_dir / "tile" / "000.png"), "category": "tile", "anomaly_type": "crack",
             "run_dir": str(tmp_path / "run")},
            {"configurable": overrides, "recursion_limit": recursion_limit(cfg)},
        )
    assert out["status"] == "success"
    record = json.loads(open(out["result"]["trajectory_path"]).read())
    assert [e["judge"] for e in record["evaluations"].values()] == ["vlm"]
    assert record["generations"]["2"]["prompt"].startswith("Add one medium dark crack")

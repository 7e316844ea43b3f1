"""Reading tool calls out of model replies, and writing the run back as chat messages."""

from __future__ import annotations

import json

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from graph.configuration import Configuration
from graph.policies.chat import chat_messages, to_openai_messages
from graph.inference.hermes import extract_text_calls, parse_completion


def test_hermes_tool_call_is_parsed_and_the_thought_kept():
    reply = 'First I need an instruction.\n<tool_call>\n{"name": "prompt_gen", "arguments": {"feedback": ""}}\n</tool_call>'
    message = parse_completion(reply)
    assert message.content == "First I need an instruction."
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("prompt_gen", {"feedback": ""})]
    assert message.tool_calls[0]["id"].startswith("call_")
    assert not message.invalid_tool_calls


def test_unclosed_tool_call_is_parsed_because_generation_stops_at_the_closing_tag():
    message = parse_completion('<tool_call>\n{"name": "quality_eval", "arguments": {"image": 2}}\n')
    assert message.tool_calls[0]["args"] == {"image": 2}


def test_each_tool_call_block_becomes_a_call():
    reply = (
        '<tool_call>{"name": "prompt_gen", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "image_gen", "arguments": {"prompt": "Add a scratch", "image": 1}}</tool_call>'
    )
    assert [c["name"] for c in parse_completion(reply).tool_calls] == ["prompt_gen", "image_gen"]


def test_bad_json_in_a_tool_call_becomes_an_invalid_call_with_the_reason():
    message = parse_completion('Let me try. <tool_call>{"name": "image_gen", "arguments": {"prompt": "x",}</tool_call>')
    assert not message.tool_calls
    (bad,) = message.invalid_tool_calls
    assert bad["name"] == "image_gen"
    assert "not valid JSON" in bad["error"]
    assert bad["id"]
    assert message.content == "Let me try."


def test_tool_call_without_a_name_is_invalid():
    message = parse_completion('<tool_call>{"arguments": {}}</tool_call>')
    assert message.invalid_tool_calls[0]["error"] == "the tool call has no 'name'"


def test_bare_json_call_is_accepted_also_in_a_code_fence_and_with_parameters():
    message = parse_completion('```json\n{"name": "mask_gen", "parameters": {"image": 3}}\n```')
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("mask_gen", {"image": 3})]
    assert message.content == ""


def test_arguments_given_as_a_json_string_are_decoded():
    message = parse_completion('<tool_call>{"name": "quality_eval", "arguments": "{\\"image\\": 2}"}</tool_call>')
    assert message.tool_calls[0]["args"] == {"image": 2}


def test_plain_text_is_a_final_answer():
    message = parse_completion("Image 3 has the defect and its mask. Done.")
    assert not message.tool_calls and not message.invalid_tool_calls
    assert message.content == "Image 3 has the defect and its mask. Done."


def test_json_without_a_call_shape_is_not_a_call():
    thought, bodies = extract_text_calls('The score was {"location": 4}.')
    assert bodies == [] and thought == 'The score was {"location": 4}.'


def test_native_calls_win_and_broken_arguments_become_invalid():
    native = [
        {"id": "a", "type": "function", "function": {"name": "prompt_gen", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "image_gen", "arguments": "{broken"}},
    ]
    message = parse_completion("thinking", native, reasoning="why")
    assert [c["id"] for c in message.tool_calls] == ["a"]
    assert message.invalid_tool_calls[0]["id"] == "b" and "not valid JSON" in message.invalid_tool_calls[0]["error"]
    assert message.content == "why\n\nthinking"


def test_invalid_calls_are_sent_back_so_their_error_observation_has_a_call():
    messages = [
        SystemMessage("s"),
        HumanMessage("h"),
        AIMessage("t", invalid_tool_calls=[{"name": "x", "args": "{bad", "id": "c2", "error": "e", "type": "invalid_tool_call"}]),
        ToolMessage("Error: bad", tool_call_id="c2", name="x"),
    ]
    converted = to_openai_messages(messages)
    assert converted[2]["tool_calls"] == [{"type": "function", "id": "c2", "function": {"name": "x", "arguments": "{bad"}}]
    assert converted[3]["tool_call_id"] == "c2"


def _state_with_images(tmp_path):
    import numpy as np

    from tools.image_store import ImageStore

    store = ImageStore(tmp_path)
    normal = np.full((32, 32, 3), 120, np.uint8)
    edited = normal.copy()
    edited[10:14, 10:20] = 20
    images = {"1": store.put(normal), "2": store.put(edited)}
    call = {"name": "image_gen", "args": {"prompt": "Add a scratch", "image": 1}, "id": "c1", "type": "tool_call"}
    return {
        "run_dir": str(tmp_path),
        "images": images,
        "messages": [
            SystemMessage("sys"),
            HumanMessage("Here is the normal image <image 1>."),
            AIMessage("go", tool_calls=[call]),
            ToolMessage("Generated <image 2> by editing image 1.", tool_call_id="c1", name="image_gen"),
        ],
    }


def test_text_policy_sees_only_placeholders(tmp_path):
    messages = chat_messages(_state_with_images(tmp_path), Configuration())
    assert all(isinstance(m["content"], str) for m in messages)
    assert "data:image" not in json.dumps(messages)


def test_vision_policy_gets_the_normal_image_in_the_first_user_message(tmp_path):
    messages = chat_messages(_state_with_images(tmp_path), Configuration(vision=True))
    parts = messages[1]["content"]
    assert parts[0]["type"] == "text" and "<image 1>" in parts[0]["text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert len(messages) == 4  # generated images only on request


def test_vision_policy_with_generated_images_sees_each_new_image_after_its_observation(tmp_path):
    messages = chat_messages(_state_with_images(tmp_path), Configuration(vision=True, show_generated_images=True))
    assert messages[3]["role"] == "tool"
    last = messages[4]
    assert last["role"] == "user" and last["content"][0]["text"] == "<image 2>:"
    assert last["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")

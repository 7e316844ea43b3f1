"""Validation of the policy's tool calls: every malformed call becomes a readable error."""

from graph.tool_calls import TOOL_NAMES, InvalidCall, ValidCall, tool_schemas, validate_call


def test_schemas_list_the_five_tools_with_required_arguments():
    schemas = {s["function"]["name"]: s["function"] for s in tool_schemas()}
    assert set(schemas) == set(TOOL_NAMES) == {"prompt_gen", "image_gen", "quality_eval", "knowledge_retrieval", "mask_gen"}
    assert schemas["image_gen"]["parameters"]["required"] == ["prompt"]
    assert schemas["mask_gen"]["parameters"]["required"] == ["image"]
    assert all(s["description"] for s in schemas.values())


def test_valid_call_accepts_dict_and_json_string_arguments():
    a = validate_call("image_gen", {"prompt": "Add one small dark scratch", "image": 1}, "c1")
    b = validate_call("image_gen", '{"prompt": "Add one small dark scratch"}', "c2")
    assert isinstance(a, ValidCall) and isinstance(b, ValidCall)
    assert b.args.image == 1


def test_unknown_tool_is_rejected_with_the_tool_list():
    result = validate_call("draw_defect", {}, "c1")
    assert isinstance(result, InvalidCall)
    assert "unknown tool 'draw_defect'" in result.error and "mask_gen" in result.error


def test_bad_json_missing_and_wrong_typed_arguments_are_rejected():
    bad_json = validate_call("quality_eval", '{"image": 2', "c1")
    missing = validate_call("quality_eval", {}, "c2")
    wrong = validate_call("mask_gen", {"image": "two"}, "c3")
    not_object = validate_call("mask_gen", "[2]", "c4")
    normal_image = validate_call("quality_eval", {"image": 1}, "c5")
    assert isinstance(bad_json, InvalidCall) and "not valid JSON" in bad_json.error
    assert isinstance(missing, InvalidCall) and "'image'" in missing.error
    assert isinstance(wrong, InvalidCall) and "'image'" in wrong.error
    assert isinstance(not_object, InvalidCall) and "JSON object" in not_object.error
    assert isinstance(normal_image, InvalidCall)

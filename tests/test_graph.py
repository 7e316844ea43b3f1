"""The agent graph end to end with the scripted policy and the embedded tools (real files, real chromadb)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graph.graph import build_graph, recursion_limit
from graph.configuration import Configuration
from tools.image_store import ImageStore
from tools.imaging import load_image, load_mask

SEVEN_NODES = {"policy", "prompt_gen", "image_gen", "quality_eval", "knowledge_retrieval", "mask_gen", "finalize"}


def _run(image: Path, category: str, anomaly_type: str, run_dir: Path, seed: int = 0, **configurable):
    cfg = Configuration.load(overrides=configurable)
    return build_graph().invoke(
        {"image": str(image), "category": category, "anomaly_type": anomaly_type, "seed": seed, "run_dir": str(run_dir)},
        {"configurable": configurable, "recursion_limit": recursion_limit(cfg)},
    )


def test_the_graph_langgraph_json_names_has_the_seven_nodes():
    import importlib.util

    from langgraph_sdk.runtime import _ReadRuntime

    spec_text = json.loads((Path(__file__).parents[1] / "langgraph.json").read_text())["graphs"]["anomaly_agent"]
    path, attribute = spec_text.split(":")
    spec = importlib.util.spec_from_file_location("served_graph", Path(__file__).parents[1] / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    factory = getattr(module, attribute)  # called as the server calls it to read the graph
    served = factory(_ReadRuntime(access_context="assistants.read", user=None, store=None))
    nodes = set(served.get_graph().nodes) - {"__start__", "__end__"}
    assert nodes == SEVEN_NODES


@pytest.mark.parametrize("category,anomaly_type", [("metal_nut", "scratch"), ("tile", "crack"), ("capsule", "poke")])
def test_scripted_run_writes_anomaly_mask_and_trajectory(sample_dir, tmp_path, category, anomaly_type):
    image = sorted((sample_dir / category).glob("*.png"))[0]
    state = _run(image, category, anomaly_type, tmp_path / "run", seed=3)
    result = state["result"]
    assert state["status"] in ("success", "budget_exhausted")
    anomaly, normal = load_image(result["anomaly_path"]), load_image(image)
    mask = load_mask(result["mask_path"])
    assert anomaly.shape == normal.shape and mask.shape == normal.shape[:2]
    assert mask.any() and not np.array_equal(anomaly, normal)
    record = json.loads(Path(result["trajectory_path"]).read_text())
    assert record["calls"][0] == "prompt_gen" and record["calls"][-1] == "mask_gen"
    assert record["source"] == "graph" and record["category"] == category


def test_trajectory_messages_pair_every_tool_call_with_its_result(sample_dir, tmp_path):
    image = sorted((sample_dir / "metal_nut").glob("*.png"))[0]
    state = _run(image, "metal_nut", "color", tmp_path / "run", seed=1)
    messages = json.loads(Path(state["result"]["trajectory_path"]).read_text())["messages"]
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    for i, message in enumerate(messages):
        for call in message.get("tool_calls", []):
            answer = messages[i + 1]
            assert answer["role"] == "tool" and answer["tool_call_id"] == call["id"]
            json.loads(call["function"]["arguments"])
    assert messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")


def test_exhausted_step_budget_returns_best_image_with_a_mask(sample_dir, tmp_path):
    image = sorted((sample_dir / "tile").glob("*.png"))[0]
    state = _run(image, "tile", "oil", tmp_path / "run", max_steps=2)
    assert state["status"] == "budget_exhausted"
    assert state["result"]["mask_by"] == "finalize"
    assert load_mask(state["result"]["mask_path"]).any()


def test_image_input_as_data_url_runs(sample_dir, tmp_path):
    from tools.imaging import encode_data_url

    image = sorted((sample_dir / "capsule").glob("*.png"))[0]
    url = encode_data_url(load_image(image))
    state = _run(url, "capsule", "scratch", tmp_path / "run")  # type: ignore[arg-type]
    assert Path(state["result"]["anomaly_path"]).is_file()


def _attempts(sample_dir: Path, tmp_path: Path, prompts: list[str], category: str = "carpet", anomaly_type: str = "color"):
    """IG's output for each prompt in turn, through the graph's own image_gen node on one run's state."""
    from graph.nodes import run_image_gen, start_run

    cfg = Configuration.load()
    image = sorted((sample_dir / category).glob("*.png"))[0]
    state = start_run({"image": str(image), "category": category, "anomaly_type": anomaly_type, "seed": 3,
                       "run_dir": str(tmp_path / "run")}, cfg)
    store, normal = ImageStore(tmp_path / "run"), load_image(image).astype(float)
    attempts = []
    for prompt in prompts:
        state = {**state, "calls": [*state.get("calls", []), "image_gen"]}
        _, update = run_image_gen(state, {"prompt": prompt, "image": 1}, cfg)
        state = {**state, **update}
        record = state["generations"][str(len(state["images"]))]
        region = store.get(record["region_id"]) > 0
        change = np.abs(store.get(record["image_id"]).astype(float) - normal).max(axis=2)
        look = record["info"]["defects"][0]["look"]
        attempts.append({"seed": record["info"]["seed"], "area": int(region.sum()), "extent": look["extent_frac"],
                         "contrast": look["contrast"], "strength": float(np.median(change[region]))})
    return attempts


def test_a_refined_instruction_changes_only_what_its_words_changed(sample_dir, tmp_path):
    # The review asked for a larger, then a stronger defect: each refined attempt keeps the quantile of
    # every appearance range, so it comes out larger, then stronger, not a new lottery that may come out
    # smaller or fainter (where it goes is drawn anew each attempt).
    words = "Add one {size} dark stain with sharp edges, {contrast} contrast, anywhere on the carpet."
    first, bigger, stronger = _attempts(sample_dir, tmp_path, [
        words.format(size="tiny", contrast="low"),
        words.format(size="small", contrast="low"),
        words.format(size="small", contrast="medium"),
    ])
    assert bigger["extent"] > 2 * first["extent"] and bigger["area"] > 2 * first["area"]
    assert bigger["contrast"] == pytest.approx(first["contrast"])
    assert stronger["contrast"] > 2 * bigger["contrast"] and stronger["strength"] > 1.5 * bigger["strength"]
    assert stronger["extent"] == pytest.approx(bigger["extent"])


def test_an_instruction_sent_again_word_for_word_draws_anew(sample_dir, tmp_path):
    prompt = "Add one medium dark stain with sharp edges, medium contrast, anywhere on the carpet."
    once, again = _attempts(sample_dir, tmp_path, [prompt, prompt])
    assert once["seed"] != again["seed"]
    assert once["extent"] != pytest.approx(again["extent"])

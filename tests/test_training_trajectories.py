"""Trajectory export: batch roots, run files and checkpoint threads give the same records; the dataset renders like inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graph.batch import list_images, plan, run_batch
from anomaly_agent_cli import main
from graph.tool_calls import tool_schemas
from training.trajectories import (
    TrajectoryError,
    canonical_arguments,
    export_records,
    iter_records,
    normalise_record,
    to_hf_dataset,
)


@pytest.fixture(scope="module")
def batch_root(sample_dir, tmp_path_factory) -> Path:
    """A scripted batch of two runs (each also checkpointed to SQLite and written as trajectory.json)."""
    root = tmp_path_factory.mktemp("batch")
    samples = plan(list_images(sample_dir / "tile")[:1], "tile", ["crack", "oil"], 1, root, seed=3)
    run_batch(samples, root, overrides={"policy": "scripted"}, progress=False)
    return root


def test_batch_root_run_files_and_checkpoint_threads_export_the_same_conversations(batch_root):
    from_jsonl = [normalise_record(r) for r in iter_records([batch_root])]
    from_files = [normalise_record(r) for r in iter_records(sorted(batch_root.rglob("trajectory.json")))]
    from_sqlite = [normalise_record(r) for r in iter_records(sorted(batch_root.rglob("*.sqlite")))]
    assert len(from_jsonl) == len(from_files) == len(from_sqlite) == 2
    for a, b, c in zip(from_jsonl, from_files, from_sqlite):
        assert a["messages"] == b["messages"] == c["messages"]
        assert a["final"]["mask_path"] == c["final"]["mask_path"]
        assert a["tools"] == tool_schemas() and a["source"] == "graph"


def test_export_writes_canonical_jsonl_and_a_dataset_trl_can_read(batch_root, tmp_path):
    from datasets import load_from_disk

    summary = export_records([batch_root], tmp_path / "t.jsonl", hf_dataset=tmp_path / "ds")
    assert summary["kept"] == 2 and summary["sources"] == {"graph": 2}
    record = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
    assert {"id", "category", "anomaly_type", "images", "messages", "tools", "evaluations", "final_image",
            "final_mask", "score", "source"} <= set(record)
    assert Path(record["images"]["1"]).is_file() and Path(record["final_mask"]).is_file()
    calls = [c for m in record["messages"] for c in m.get("tool_calls", [])]
    assert calls and all(isinstance(c["function"]["arguments"], str) for c in calls)
    dataset = load_from_disk(str(tmp_path / "ds"))
    assert {"messages", "tools"} <= set(dataset.column_names) and "images" not in dataset.column_names
    assert json.loads(dataset[0]["tools"]) == tool_schemas()


def test_dataset_rows_render_exactly_as_the_local_policy_renders_the_run(batch_root, tmp_path):
    """TRL renders dataset rows; the local policy renders the live conversation: the text must be the same."""
    from tiny_llm import build_tiny_llm
    from transformers import AutoTokenizer

    from graph.inference.model import _arguments_as_objects
    from training.chat_templates import TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_llm(tmp_path / "llm"))
    records = [normalise_record(r) for r in iter_records([batch_root])]
    dataset = to_hf_dataset(records)
    for name, template in TEMPLATES.items():
        for record, row in zip(records, dataset):
            trained = tokenizer.apply_chat_template(row["messages"], tools=json.loads(row["tools"]), chat_template=template,
                                                    tokenize=False)
            live = tokenizer.apply_chat_template([_arguments_as_objects(m) for m in record["messages"]], tools=tool_schemas(),
                                                 chat_template=template, tokenize=False)
            assert trained == live, name


def test_assistant_mask_covers_calls_and_end_of_turn_but_no_tool_results(batch_root, tmp_path):
    from tiny_llm import build_tiny_llm
    from transformers import AutoTokenizer

    from training.chat_templates import COMPACT_CHATML_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_llm(tmp_path / "llm"))
    record = normalise_record(next(iter_records([batch_root])))
    out = tokenizer.apply_chat_template(record["messages"], tools=record["tools"], chat_template=COMPACT_CHATML_TEMPLATE,
                                        tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    turns = [m for m in record["messages"] if m["role"] == "assistant"]
    assert trained.count("<tool_call>") == sum(len(m.get("tool_calls") or []) for m in turns) > 0
    assert trained.count("<|im_end|>") == len(turns)
    assert "<tool_response>" not in trained and "inspection-data engineer" not in trained


def test_arguments_are_written_as_tojson_writes_them():
    assert canonical_arguments('{"prompt":"a  b", "image":2}') == '{"prompt": "a  b", "image": 2}'
    assert canonical_arguments({"image": 2}) == '{"image": 2}'
    assert canonical_arguments("{not json") == "{not json"


def test_export_of_nothing_usable_says_so(tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(TrajectoryError, match="no trajectory"):
        export_records([tmp_path / "empty.jsonl"], tmp_path / "out.jsonl")


def test_cli_export_prints_counts(batch_root, tmp_path, capsys):
    assert main(["trajectories", "export", "--input", str(batch_root), "--out", str(tmp_path / "t.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"] == 2
    assert main(["trajectories", "export", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "u.jsonl")]) == 2


def test_a_vision_dataset_carries_the_normal_image_and_an_image_part_in_the_first_user_turn(batch_root):
    records = [normalise_record(r) for r in iter_records([batch_root])]
    row = to_hf_dataset(records, with_images=True)[0]
    (image,) = row["images"]
    assert image.size == (128, 128)
    user = next(m for m in row["messages"] if m["role"] == "user")
    assert [p["type"] for p in user["content"]] == ["image", "text"]

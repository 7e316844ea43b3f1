"""Batch runs in the MVTec layout: complete outputs, and resume after kill -9 without loss or duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from graph.batch import BatchError, Sample, list_images, plan, run_batch, run_sample


def _cli() -> str:
    return str(Path(sys.executable).with_name("anomaly-agent"))


def _check_complete(root: Path, category: str, types: list[str], expected: int) -> list[dict]:
    images = sorted((root / category / "test").rglob("*.png"))
    masks = sorted((root / category / "ground_truth").rglob("*_mask.png"))
    assert len(images) == expected and len(masks) == expected
    for t in types:
        numbers = sorted(int(p.stem) for p in (root / category / "test" / t).glob("*.png"))
        assert numbers == list(range(expected // len(types)))
    records = [json.loads(line) for line in (root / "trajectories.jsonl").read_text().splitlines()]
    keys = [(r["anomaly_type"], r["sample"]["number"]) for r in records]
    assert len(keys) == expected and len(set(keys)) == expected
    assert not [p for p in root.rglob("*.tmp")], "temporary files left behind"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["samples"] == expected
    assert (root / "contact_sheet.png").is_file()
    return records


def test_batch_writes_mvtec_layout_and_summary(sample_dir, tmp_path):
    root = tmp_path / "out"
    samples = plan(list_images(sample_dir / "tile"), "tile", ["crack", "oil"], 2, root, seed=0)
    summary = run_batch(samples, root, overrides={}, progress=False)
    records = _check_complete(root, "tile", ["crack", "oil"], expected=8)
    assert summary["mask_nonempty_rate"] == 1.0
    assert summary["mask_iou_mean"] is not None
    assert set(summary["statuses"]) <= {"success", "budget_exhausted"}
    assert all(r["calls"][0] == "prompt_gen" and r["calls"][-1] == "mask_gen" for r in records)
    with pytest.raises(BatchError, match="--resume"):
        run_batch(samples, root, overrides={}, progress=False)


def _interrupted_sample(sample_dir: Path, tmp_path: Path, interrupt) -> tuple[Sample, Any]:
    """Plan one metal_nut scratch sample and start its graph run, which `interrupt` stops part-way.

    `interrupt(saver)` returns (checkpointer, invoke kwargs) for the first run; the run's end state
    is left in the sample's own checkpoint file, where `run_sample` must pick it up. Returns the
    sample and its graph state after the first run.
    """
    from langgraph.checkpoint.sqlite import SqliteSaver

    from graph.graph import build_graph

    root = tmp_path / "out"
    sample = plan(list_images(sample_dir / "metal_nut"), "metal_nut", ["scratch"], 1, root, seed=0)[0]
    Path(sample.work_dir).mkdir(parents=True)
    thread = {"configurable": {"thread_id": f"metal_nut/scratch/{sample.number:03d}"}}
    inputs = {"image": sample.image, "category": "metal_nut", "anomaly_type": "scratch", "seed": sample.seed, "run_dir": sample.work_dir}
    with SqliteSaver.from_conn_string(str(Path(sample.work_dir) / "checkpoints.sqlite")) as saver:
        checkpointer, kwargs = interrupt(saver)
        try:
            build_graph(checkpointer=checkpointer).invoke(inputs, thread, **kwargs)
        except KeyboardInterrupt:
            pass  # a simulated kill
        state = build_graph(checkpointer=saver).get_state(thread)
    assert state.values and state.tasks and "status" not in state.values, "the first run should stop part-way"
    return sample, state


def _check_resumed(sample) -> None:
    row = run_sample(sample, overrides={})
    assert row["status"] in {"success", "budget_exhausted"}
    assert row["calls"][:3] == ["prompt_gen", "image_gen", "quality_eval"]
    assert row["calls"].count("prompt_gen") == 1 and row["calls"][-1] == "mask_gen"
    assert Path(sample.anomaly_out).is_file() and Path(sample.mask_out).is_file()


def test_sample_interrupted_mid_graph_resumes_from_its_checkpoint(sample_dir, tmp_path):
    sample, state = _interrupted_sample(sample_dir, tmp_path, lambda saver: (saver, {"interrupt_after": ["image_gen"]}))
    assert state.next == ("policy",)
    _check_resumed(sample)


def _dying_saver(saver, die_at_step: int):
    """A SqliteSaver on `saver`'s connection that dies (as kill -9 would) when a checkpoint is due.

    The node's writes are already saved as pending writes at that moment: the window in which a real
    kill left a sample whose graph state had no `next` node, yet was unfinished.
    """
    from langgraph.checkpoint.sqlite import SqliteSaver

    class DyingSaver(SqliteSaver):
        def put(self, config, checkpoint, metadata, new_versions):
            if metadata.get("step") == die_at_step:
                raise KeyboardInterrupt("simulated kill between a node's writes and the next checkpoint")
            return super().put(config, checkpoint, metadata, new_versions)

    return DyingSaver(saver.conn)


def test_sample_killed_between_node_writes_and_checkpoint_still_finishes(sample_dir, tmp_path):
    # step 1 = policy, step 2 = prompt_gen: die when the checkpoint after prompt_gen is due
    sample, state = _interrupted_sample(sample_dir, tmp_path, lambda saver: (_dying_saver(saver, die_at_step=2), {}))
    assert not state.next and [task.name for task in state.tasks] == ["prompt_gen"], "only pending writes should be left"
    _check_resumed(sample)


@pytest.mark.integration
def test_kill_9_then_resume_finishes_without_loss_or_duplicates(sample_dir, tmp_path):
    root = tmp_path / "out"
    command = [_cli(), "batch", "--input", str(sample_dir / "metal_nut"), "--category", "metal_nut",
               "--anomaly-types", "scratch,color", "--per-image", "2", "--out", str(root), "--seed", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(root.glob(".work/*/*/*/done.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(root.glob(".work/*/*/*/done.json")))
    assert 2 <= done_before < 8, "the kill should land mid-batch"

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _check_complete(root, "metal_nut", ["scratch", "color"], expected=8)


def test_resume_reruns_samples_that_failed_on_the_policy_endpoint(sample_dir, tmp_path):
    root = tmp_path / "out"
    samples = plan(list_images(sample_dir / "tile")[:1], "tile", ["crack"], 1, root, seed=0)
    dead = {"policy": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "max_retries": 0, "request_timeout_s": 2}
    first = run_batch(samples, root, overrides=dead, progress=False)
    assert first["statuses"] == {"policy_error": 1}
    again = run_batch(samples, root, overrides={}, resume=True, progress=False)
    assert set(again["statuses"]) <= {"success", "budget_exhausted"} and again["samples"] == 1
    _check_complete(root, "tile", ["crack"], expected=1)

"""Batch runs in the MVTec layout: complete outputs, and resume after kill -9 without loss or duplicates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from graph.batch import BatchError, Sample, all_done_rows, list_images, plan, run_batch, run_sample


def _cli() -> str:
    return str(Path(sys.executable).with_name("anomaly-agent"))


def _check_complete(root: Path, category: str, types: list[str], expected: int) -> list[dict]:
    images = sorted((root / category / "test").rglob("*.png"))
    masks = sorted((root / category / "ground_truth").rglob("*_mask.png"))
    assert len(images) == expected and len(masks) == expected
    for t in types:
        stems = {p.stem for p in (root / category / "test" / t).glob("*.png")}
        assert {p.stem.removesuffix("_mask") for p in (root / category / "ground_truth" / t).glob("*.png")} == stems
        assert len(stems) == expected // len(types)
    records = [json.loads(line) for line in (root / "trajectories.jsonl").read_text().splitlines()]
    keys = [(r["anomaly_type"], r["sample"]["name"]) for r in records]
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


def test_an_image_outside_a_set_input_root_is_an_input_error_not_a_stopped_batch(sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALY_AGENT_INPUT_ROOT", str(tmp_path / "inputs"))
    root = tmp_path / "out"
    summary = run_batch(plan(list_images(sample_dir / "tile")[:1], "tile", ["crack"], 1, root, seed=0), root,
                        overrides={}, progress=False)
    assert summary["statuses"] == {"input_error": 1}
    error = summary["input_errors"][0]["error"]
    assert "input 'image'" in error and "input_root" in error


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
    thread = {"configurable": {"thread_id": f"metal_nut/scratch/{sample.name}"}}
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


def _input_folder(sample_dir: Path, folder: Path, sources: dict[str, str]) -> Path:
    """A batch input folder: name -> 'category/NNN.png' of a sample image, or 'truncated' (half a PNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        data = (sample_dir / "tile" / "000.png").read_bytes()[:300] if source == "truncated" else (sample_dir / source).read_bytes()
        (folder / name).write_bytes(data)
    return folder


def _outputs(root: Path) -> dict[str, tuple[int, int]]:
    """Every output PNG under root's MVTec folders -> (inode, mtime_ns), to tell a rewrite from a kept file."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in root.glob("*/*/*/*.png") if p.parts[-3] in {"test", "ground_truth"}}


@pytest.mark.integration
def test_truncated_png_is_one_input_error_and_resume_survives_its_removal(sample_dir, tmp_path):
    folder = _input_folder(sample_dir, tmp_path / "in", {"a.png": "tile/000.png", "b.png": "tile/001.png", "c.png": "truncated"})
    root = tmp_path / "out"
    command = [_cli(), "batch", "--input", str(folder), "--category", "tile", "--anomaly-types", "crack", "--out", str(root)]

    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["samples"] == 3 and summary["statuses"].get("input_error") == 1
    assert [e["image"] for e in summary["input_errors"]] == [str((folder / "c.png").resolve())]
    assert "c.png" in summary["input_errors"][0]["error"]
    lines = first.stderr.replace("\r", "\n").splitlines()  # the progress bar redraws with \r
    error_lines = [line for line in lines if line.startswith("WARNING graph.batch: input error") and "c.png" in line]
    assert len(error_lines) == 1, first.stderr
    assert first.stderr.strip().splitlines()[-1].endswith("1 input error (listed in summary.json input_errors)")
    assert len(json.loads(first.stdout.splitlines()[-1])["statuses"]) >= 2
    assert (root / "trajectories.jsonl").is_file() and (root / "contact_sheet.png").is_file()
    made = _outputs(root)
    assert len(made) == 4  # 2 images + 2 masks

    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((root / "summary.json").read_text())["statuses"].get("input_error") == 1
    assert _outputs(root) == made, "a resume with nothing to do rewrote outputs"

    (folder / "c.png").unlink()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["samples"] == 2 and "input_error" not in summary["statuses"] and summary["input_errors"] == []
    assert resumed.stderr.strip().splitlines()[-1].endswith("; 0 input errors")
    assert _outputs(root) == made


def test_editing_the_input_folder_between_runs_neither_renumbers_loses_nor_duplicates(sample_dir, tmp_path):
    sources = {"1.png": "tile/000.png", "2.png": "tile/001.png", "3.png": "carpet/000.png", "4.png": "wood/000.png",
               "5.png": "truncated"}
    folder = _input_folder(sample_dir, tmp_path / "in", sources)
    root = tmp_path / "out"

    def run(resume: bool) -> dict:
        samples = plan(list_images(folder), "tile", ["crack"], 1, root, seed=0)
        return run_batch(samples, root, overrides={}, resume=resume, progress=False)

    first = run(resume=False)
    assert first["samples"] == 5 and first["statuses"]["input_error"] == 1
    kept = _outputs(root)
    assert len(kept) == 8

    # Fix the bad file, add one before the others in sorted order, remove another, and delete the
    # fixed file's stale work folder: the four made samples keep their names and are not rerun.
    _input_folder(sample_dir, folder, {"5.png": "carpet/001.png", "0.png": "wood/001.png"})
    (folder / "4.png").unlink()
    bad = [row for row in all_done_rows(root) if row["status"] == "input_error"]
    shutil.rmtree(bad[0]["work_dir"])
    second = run(resume=True)
    assert second["samples"] == 6 and "input_error" not in second["statuses"]
    now = _outputs(root)
    assert len(now) == 12 and {k: now[k] for k in kept} == kept, "a made sample was renamed or rewritten"
    names = [row["name"] for row in all_done_rows(root)]
    assert len(set(names)) == len(names) == 6

    # Without any batch state, the same inputs land on the same names: nothing new appears.
    shutil.rmtree(root / ".work")
    third = run(resume=True)
    assert third["samples"] == 5 and "input_error" not in third["statuses"]
    assert set(_outputs(root)) == set(now)


def test_sample_identity_follows_content_not_position(sample_dir, tmp_path):
    images = list_images(sample_dir / "tile")
    alone = plan(images[1:], "tile", ["crack", "oil"], 2, tmp_path, seed=5)
    together = plan(images, "tile", ["oil", "crack"], 2, tmp_path, seed=5)
    key = lambda s: (s.anomaly_type, s.name, s.seed, s.work_dir, s.anomaly_out)  # noqa: E731
    assert {key(s) for s in alone} < {key(s) for s in together}
    assert len({s.anomaly_out for s in together}) == len(together) == 8


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is `pid`, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _stat(int(entry.name))[1:] == ("alive", pid):
            found.append(int(entry.name))
    return found


def _stat(pid: int) -> tuple[int, str, int]:
    """(pid, 'alive'/'gone', parent pid) from /proc/PID/stat; a zombie counts as gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return pid, "gone", 0
    return pid, "gone" if fields[0] in "ZX" else "alive", int(fields[1])


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")
def test_sigkill_of_a_batch_takes_its_workers_down_and_resume_then_finishes(sample_dir, tmp_path):
    root = tmp_path / "out"
    command = [_cli(), "batch", "--input", str(sample_dir / "tile"), "--category", "tile", "--anomaly-types", "crack,oil",
               "--per-image", "2", "--out", str(root), "--workers", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(root.glob(".work/*/*/*/done.json")):
            time.sleep(0.05)
        children = _children(proc.pid)  # the two workers and multiprocessing's resource tracker
        assert len(children) >= 2 and proc.poll() is None, "the kill should land while workers run"
    finally:
        proc.send_signal(signal.SIGKILL)  # the batch process alone, as `kill -9 PID` does
        proc.wait()
    deadline = time.monotonic() + 60  # generous: the kernel kills them at once, the fallback within ~1 s
    while time.monotonic() < deadline and any(_stat(pid)[1] == "alive" for pid in children):
        time.sleep(0.1)
    assert [pid for pid in children if _stat(pid)[1] == "alive"] == []

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _check_complete(root, "tile", ["crack", "oil"], expected=8)


def test_a_second_batch_into_a_held_root_is_refused_in_one_line(sample_dir, tmp_path):
    from graph.batch_guard import hold_root

    root = tmp_path / "out"
    command = [_cli(), "batch", "--input", str(sample_dir / "tile"), "--category", "tile", "--anomaly-types", "crack", "--out", str(root)]
    with hold_root(root / ".work"):
        busy = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert busy.returncode == 2
    assert busy.stderr.strip().splitlines() == [f"anomaly-agent: error: another batch is writing into {root}; wait for it to end or choose another --out"]
    assert not list(root.glob(".work/*/*/*/done.json")) and not (root / "summary.json").exists()

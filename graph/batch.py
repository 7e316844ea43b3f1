"""Batch synthesis into the MVTec-AD layout, resumable after any interruption.

Why this shape: a batch of thousands of samples will be interrupted (kill -9, a full disk, a
preempted machine). Each sample therefore has a fixed number, seed and work folder decided up front
from the inputs alone; its graph run checkpoints to a SQLite file in that folder, so a resumed run
continues mid-graph; its outputs are written atomically and only then marked done. `--resume` skips
done samples and re-enters the rest, so nothing is lost or written twice. The joint files
(trajectories.jsonl, summary.json, contact_sheet.png) are rebuilt from the per-sample records at the
end, never appended to, so a crash cannot leave a duplicated line.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import statistics
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from graph.configuration import Configuration
from graph.nodes import INFRASTRUCTURE_STATUSES
from tools.contact_sheet import SheetRow, make_contact_sheet
from tools.dataset_layout import IMAGE_SUFFIXES, mvtec_anomaly_path, mvtec_mask_path
from tools.imaging import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

WORK_DIR = ".work"
DONE_FILE = "done.json"
#: Outcomes caused by infrastructure (a dead policy endpoint or tool backend), rerun by --resume.
RETRY_STATUSES = INFRASTRUCTURE_STATUSES


class BatchError(RuntimeError):
    """The batch cannot start as asked (empty input, an existing output without --resume...)."""


@dataclass(frozen=True)
class Sample:
    """One planned sample: everything needed to run it, fixed by the inputs alone."""

    index: int
    image: str
    category: str
    anomaly_type: str
    number: int
    seed: int
    work_dir: str
    anomaly_out: str
    mask_out: str


#: Runs planned samples with `run_sample` and yields their rows as they finish:
#: ``execute(todo, overrides, progress=..., total=..., initial=...)`` (total and initial size the progress bar).
Executor = Callable[..., Iterable[dict[str, Any]]]


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted, so the plan is the same on every run."""
    if not folder.is_dir():
        raise BatchError(f"input folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and WORK_DIR not in p.parts)
    if not images:
        raise BatchError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def plan(images: list[Path], category: str, anomaly_types: list[str], per_image: int, root: Path, seed: int) -> list[Sample]:
    """Number every sample: per type, image i's k-th sample is number i*per_image + k.

    The seed depends on (seed, category, type, number) only, so a resumed batch draws the same samples
    whatever order the types are given in.
    """
    samples = []
    for anomaly_type in anomaly_types:
        for i, image in enumerate(images):
            for k in range(per_image):
                number = i * per_image + k
                index = len(samples)
                samples.append(
                    Sample(
                        index=index,
                        image=str(image.resolve()),
                        category=category,
                        anomaly_type=anomaly_type,
                        number=number,
                        seed=(seed * 1_000_003 + zlib.crc32(f"{category}/{anomaly_type}".encode()) + number) % 2**31,
                        work_dir=str(root / WORK_DIR / category / anomaly_type / f"{number:03d}"),
                        anomaly_out=str(mvtec_anomaly_path(root, category, anomaly_type, number)),
                        mask_out=str(mvtec_mask_path(root, category, anomaly_type, number)),
                    )
                )
    return samples


def run_sample(sample: Sample, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) one sample's graph, place its outputs in the MVTec layout, mark it done."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    from graph.graph import build_graph, recursion_limit

    work = Path(sample.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(sample)
    cfg = Configuration.load(overrides=overrides)
    started = time.perf_counter()
    thread_id = f"{sample.category}/{sample.anomaly_type}/{sample.number:03d}"
    thread = {"configurable": {"thread_id": thread_id, **overrides}, "recursion_limit": recursion_limit(cfg)}
    with SqliteSaver.from_conn_string(str(work / "checkpoints.sqlite")) as saver:
        agent = build_graph(checkpointer=saver)
        existing = agent.get_state(thread)
        if existing.values and existing.tasks:
            # `tasks`, not `next`: a node that finished just before the kill has its writes saved
            # as pending writes, so it is no longer in `next`, yet the graph has not moved on.
            logger.info("resuming sample %s at %s", sample.index, [task.name for task in existing.tasks])
            agent.invoke(None, thread)
        elif not existing.values:
            agent.invoke(
                {
                    "image": sample.image,
                    "category": sample.category,
                    "anomaly_type": sample.anomaly_type,
                    "seed": sample.seed,
                    "run_dir": str(work),
                },
                thread,
            )
        final = agent.get_state(thread)
    if final.tasks or "status" not in final.values:
        # Never mark an unfinished run done: the next --resume must pick it up again.
        raise RuntimeError(f"sample {thread_id} stopped before finalize (pending: {[t.name for t in final.tasks]})")
    values = final.values
    result = values.get("result") or {}
    row: dict[str, Any] = {
        **asdict(sample),
        "status": values.get("status", "failed"),
        "seconds": round(time.perf_counter() - started, 3),
        "score": result.get("score"),
        "passed": result.get("passed"),
        "mask_iou": result.get("mask_iou"),
        "mask_area_fraction": result.get("mask_area_fraction"),
        "mask_by": result.get("mask_by"),
        "steps": result.get("steps"),
        "image_gens": result.get("image_gens"),
        "calls": values.get("calls", []),
        "trajectory": result.get("trajectory_path"),
    }
    if result.get("anomaly_path"):
        _copy_atomic(Path(result["anomaly_path"]), Path(sample.anomaly_out))
        _copy_atomic(Path(result["mask_path"]), Path(sample.mask_out))
    write_json_atomic(work / DONE_FILE, row)
    return row


def _sweep_temporaries(sample: Sample) -> None:
    """Remove temporary files a killed run of this sample left behind.

    Safe because a sample is only ever run by one process at a time: any temporary file in its own
    work folder, or beside its own outputs, is an orphan of an earlier, interrupted attempt.
    """
    orphans = list(Path(sample.work_dir).rglob(".*.tmp"))
    for target in (Path(sample.anomaly_out), Path(sample.mask_out)):
        orphans += list(target.parent.glob(f".{target.name}*.tmp"))
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    if orphans:
        logger.info("removed %d orphaned temporary files of sample %s", len(orphans), sample.index)


def _copy_atomic(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, temporary)
    temporary.replace(target)


def _done_row(sample: Sample) -> dict[str, Any] | None:
    path = Path(sample.work_dir) / DONE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn marker cannot exist (atomic writes), but treat anything odd as not done


def run_batch(
    samples: list[Sample],
    root: Path,
    *,
    overrides: dict[str, Any],
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Run every sample not yet done, then write trajectories.jsonl, summary.json and contact_sheet.png.

    Args:
        executor: Runs the samples still to do and yields their rows (default: this machine's process
            pool of `workers`); `graph.batch_ray.RayExecutor` runs them on a Ray cluster.

    Returns:
        The summary of every finished sample under `root` (also written to root/summary.json).
    """
    done = {s.index: row for s in samples if (row := _done_row(s)) is not None}
    for sample in samples:
        if done.get(sample.index, {}).get("status") in RETRY_STATUSES and resume:
            # The endpoint failed, not the sample: start it again from nothing on resume.
            shutil.rmtree(sample.work_dir, ignore_errors=True)
            del done[sample.index]
    started_before = any(Path(s.work_dir).exists() for s in samples)
    if started_before and not resume:
        raise BatchError(f"{root} already holds a batch; pass --resume to finish it, or choose another --out")
    for orphan in root.glob(".*.tmp"):  # a kill while the joint files were being written
        orphan.unlink(missing_ok=True)
    todo = [s for s in samples if s.index not in done]
    logger.info("%d samples planned, %d already done, %d to run", len(samples), len(done), len(todo))
    started = time.perf_counter()
    execute = executor or pool_executor(workers)
    for _ in execute(todo, overrides, progress=progress, total=len(samples), initial=len(done)):
        pass
    summary = summarise(all_done_rows(root), seconds=time.perf_counter() - started)
    _write_joint_files(all_done_rows(root), root, summary)
    return summary


def all_done_rows(root: Path) -> list[dict[str, Any]]:
    """Every finished sample under `root`, from any batch into it, in (category, type, number) order.

    Why the whole root: one dataset root may be filled by several batches (one per category); its
    summary, trajectories and contact sheet describe the dataset, not the last command.
    """
    rows = []
    for marker in (root / WORK_DIR).glob(f"*/*/*/{DONE_FILE}"):
        try:
            rows.append(json.loads(marker.read_text()))
        except json.JSONDecodeError:
            logger.warning("skipping unreadable marker %s", marker)
    return sorted(rows, key=lambda r: (r["category"], r["anomaly_type"], r["number"]))


def pool_executor(workers: int) -> Executor:
    """This machine's executor: `workers` spawned processes, or this process alone when `workers` is 1."""
    return partial(_execute, workers=workers)


def _execute(todo: list[Sample], overrides: dict[str, Any], *, workers: int, progress: bool, total: int, initial: int) -> Iterator[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc="samples", unit="sample", disable=not progress)
    try:
        if workers <= 1:
            for sample in todo:
                yield run_sample(sample, overrides)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")  # torch and forked threads do not mix
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
            futures = [pool.submit(run_sample, sample, overrides) for sample in todo]
            for future in as_completed(futures):
                yield future.result()
                bar.update()
    finally:
        bar.close()


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def summarise(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Counts, rates and means over the batch's rows."""
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    ious = [row["mask_iou"] for row in rows if row.get("mask_iou") is not None]
    scores = [row["score"] for row in rows if row.get("score") is not None]
    per_sample = [row["seconds"] for row in rows]
    per_type: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = per_type.setdefault(row["anomaly_type"], {"samples": 0, "success": 0, "ious": []})
        entry["samples"] += 1
        entry["success"] += row["status"] == "success"
        if row.get("mask_iou") is not None:
            entry["ious"].append(row["mask_iou"])
    return {
        "samples": len(rows),
        "statuses": statuses,
        "success_rate": statuses.get("success", 0) / max(1, len(rows)),
        "mask_iou_mean": statistics.fmean(ious) if ious else None,
        "mask_nonempty_rate": sum((row.get("mask_area_fraction") or 0) > 0 for row in rows) / max(1, len(rows)),
        "score_mean": statistics.fmean(scores) if scores else None,
        "starts_with_prompt_gen": sum(bool(row["calls"]) and row["calls"][0] == "prompt_gen" for row in rows),
        "ends_with_mask_gen": sum(bool(row["calls"]) and row["calls"][-1] == "mask_gen" for row in rows),
        "seconds_per_sample_median": statistics.median(per_sample) if per_sample else None,
        "wall_seconds_this_run": round(seconds, 2),
        "per_type": {
            t: {"samples": e["samples"], "success": e["success"], "mask_iou_mean": statistics.fmean(e["ious"]) if e["ious"] else None}
            for t, e in per_type.items()
        },
    }


def _write_joint_files(rows: list[dict[str, Any]], root: Path, summary: dict[str, Any]) -> None:
    lines = []
    for row in rows:
        if row.get("trajectory") and Path(row["trajectory"]).is_file():
            record = json.loads(Path(row["trajectory"]).read_text())
            record["sample"] = {"number": row["number"], "image": row["anomaly_out"], "mask": row["mask_out"]}
            lines.append(json.dumps(record))
    write_text_atomic(root / "trajectories.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    write_json_atomic(root / "summary.json", summary)
    sheet_rows = [
        SheetRow(
            normal=row["image"],
            anomaly=row["anomaly_out"],
            mask=row["mask_out"],
            label=f"{row['anomaly_type']} #{row['number']:03d}  {row['status']}  score {row['score'] if row['score'] is not None else '-'}",
        )
        for row in rows
        if Path(row["anomaly_out"]).is_file()
    ]
    if sheet_rows:
        make_contact_sheet(sheet_rows, root / "contact_sheet.png")

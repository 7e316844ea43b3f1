"""Batch synthesis into the MVTec-AD layout, resumable after any interruption.

Why this shape: a batch of thousands of samples will be interrupted (kill -9, a full disk, a
preempted machine) and its input folder edited between runs. Each sample therefore has a name, seed
and work folder that follow from its input file's content (SHA-256 of the bytes) and the arguments
(category, type, index k among the image's samples, base seed), never from the file's position in a
listing: adding, removing, renaming or fixing an input file changes no other sample. Its graph run
checkpoints to a SQLite file in that folder, so a resumed run continues mid-graph; its outputs are
written atomically and only then marked done. `--resume` skips done samples and re-enters the rest,
so nothing is lost or written twice. An input image that cannot be read becomes one `input_error`
sample, never a stopped batch. The joint files (trajectories.jsonl, summary.json, contact_sheet.png)
are rebuilt from the per-sample records at the end of every run, even a failed one, never appended
to, so a crash cannot leave a duplicated line.

File names: sample k (0 <= k < 1000) of an image whose bytes hash to SHA-256 `h` is
`ROOT/<category>/test/<type>/<h[:12]>_<k:03d>.png` and `.../ground_truth/<type>/<h[:12]>_<k:03d>_mask.png`.
Equal-length stems keep images and masks in the same sorted order (what MVTec readers pair on); two
different inputs sharing a 12-hex-digit prefix are refused at planning time (odds about n^2 / 2^49).
Outputs of an input file removed later stay in the dataset; identical files are one input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from graph.batch_guard import hold_root, init_worker
from graph.configuration import Configuration
from graph.nodes import INFRASTRUCTURE_STATUSES
from graph.run_inputs import RunInputError
from tools.contact_sheet import SheetRow, make_contact_sheet
from tools.dataset_layout import IMAGE_SUFFIXES, mvtec_anomaly_path, mvtec_mask_path
from tools.imaging import ImageInputError, load_image, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

WORK_DIR = ".work"
DONE_FILE = "done.json"
#: Outcomes caused by infrastructure (a dead policy endpoint or tool backend), rerun by --resume.
RETRY_STATUSES = INFRASTRUCTURE_STATUSES
#: Status of a sample whose input image cannot be read; rerun only when the file's content changes.
INPUT_ERROR = "input_error"
#: Hex digits of the content hash in a sample's name, and the most samples per image (3-digit k).
NAME_HASH_CHARS = 12
MAX_PER_IMAGE = 1000


class BatchError(RuntimeError):
    """The batch cannot start as asked (empty input, an existing output without --resume...)."""


@dataclass(frozen=True)
class Sample:
    """One planned sample: everything needed to run it, fixed by its input's content and the arguments.

    `index` is its position in this plan (for logs only); `name` is its identity within
    (category, anomaly_type): the MVTec file stem, work folder and checkpoint thread.
    """

    index: int
    image: str
    image_sha256: str
    category: str
    anomaly_type: str
    name: str
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


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes; a file that cannot be read is hashed by its path instead,
    so it still gets a stable identity (its sample then ends as an input error)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return hashlib.sha256(b"unreadable\0" + str(Path(path).resolve()).encode()).hexdigest()


def sample_seed(seed: int, category: str, anomaly_type: str, digest: str, k: int) -> int:
    """The graph seed of one sample: a function of the arguments and the input's content only."""
    key = f"{seed}/{category}/{anomaly_type}/{digest}/{k}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") % 2**31


def plan(images: list[Path], category: str, anomaly_types: list[str], per_image: int, root: Path, seed: int) -> list[Sample]:
    """Every sample of the batch, each named `<content hash[:12]>_<k:03d>` (see the module docstring).

    The seed depends on (seed, category, type, content, k) only, so a resumed batch draws the same
    samples whatever order the types or files are given in, and whatever else the folder holds.

    Raises:
        BatchError: `per_image` is outside 1..MAX_PER_IMAGE, or two different inputs share a name prefix.
    """
    if not 1 <= per_image <= MAX_PER_IMAGE:
        raise BatchError(f"per_image must be between 1 and {MAX_PER_IMAGE}, got {per_image}")
    inputs: dict[str, tuple[str, Path]] = {}  # name prefix -> (full digest, first file with it)
    for image in images:
        digest = file_digest(image)
        prefix = digest[:NAME_HASH_CHARS]
        if prefix in inputs:
            if inputs[prefix][0] != digest:
                raise BatchError(f"{image} and {inputs[prefix][1]} differ but share the name prefix {prefix}; remove one of them")
            logger.warning("%s has the same content as %s: planned once", image, inputs[prefix][1])
            continue
        inputs[prefix] = (digest, image)
    samples = []
    for anomaly_type in anomaly_types:
        for prefix, (digest, image) in inputs.items():
            for k in range(per_image):
                name = f"{prefix}_{k:03d}"
                samples.append(
                    Sample(
                        index=len(samples),
                        image=str(Path(image).resolve()),
                        image_sha256=digest,
                        category=category,
                        anomaly_type=anomaly_type,
                        name=name,
                        seed=sample_seed(seed, category, anomaly_type, digest, k),
                        work_dir=str(root / WORK_DIR / category / anomaly_type / name),
                        anomaly_out=str(mvtec_anomaly_path(root, category, anomaly_type, name)),
                        mask_out=str(mvtec_mask_path(root, category, anomaly_type, name)),
                    )
                )
    return samples


def run_sample(sample: Sample, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) one planned sample into its root: outputs in the MVTec layout, then its done marker.

    The unit a pool worker (or any other executor) runs; safe to call again after a kill at any point.
    An input image that cannot be read (or lies outside a set `input_root`), or whose content changed since
    planning, ends the sample with status `input_error` and the reason in the row's `error`, instead of raising.

    Returns:
        The sample's row (also written to its work folder's done.json).
    """
    work = Path(sample.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    _sweep_temporaries(sample)
    started = time.perf_counter()
    try:
        _check_input(sample)
        values = _run_graph(sample, overrides, work)
    except (ImageInputError, RunInputError) as error:
        values = {"status": INPUT_ERROR, "error": str(error).strip().splitlines()[0]}
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
        **({"error": values["error"]} if values.get("error") else {}),
    }
    if result.get("anomaly_path"):
        _copy_atomic(Path(result["anomaly_path"]), Path(sample.anomaly_out))
        _copy_atomic(Path(result["mask_path"]), Path(sample.mask_out))
    write_json_atomic(work / DONE_FILE, row)
    return row


def _check_input(sample: Sample) -> None:
    """Raise ImageInputError unless the sample's file still holds the planned content and decodes."""
    if file_digest(Path(sample.image)) != sample.image_sha256:
        raise ImageInputError(f"cannot read image {sample.image}: it is gone or changed since the batch was planned; rerun with --resume")
    load_image(sample.image)


def _run_graph(sample: Sample, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """The sample's final graph state, resuming its checkpoint when one holds an unfinished run."""
    from langgraph.checkpoint.sqlite import SqliteSaver

    from graph.graph import build_graph, recursion_limit

    cfg = Configuration.load(overrides=overrides)
    thread_id = f"{sample.category}/{sample.anomaly_type}/{sample.name}"
    thread = {"configurable": {"thread_id": thread_id, **overrides}, "recursion_limit": recursion_limit(cfg)}
    with SqliteSaver.from_conn_string(str(work / "checkpoints.sqlite")) as saver:
        agent = build_graph(checkpointer=saver)
        existing = agent.get_state(thread)
        if existing.values and existing.values.get("image") != sample.image:
            # Same content under another path (the file was moved): the old path may be gone.
            logger.info("sample %s: input moved to %s, starting it again", thread_id, sample.image)
            saver.delete_thread(thread_id)
            existing = agent.get_state(thread)
        if existing.values and existing.tasks:
            # `tasks`, not `next`: a node that finished just before the kill has its writes saved
            # as pending writes, so it is no longer in `next`, yet the graph has not moved on.
            logger.info("resuming sample %s at %s", thread_id, [task.name for task in existing.tasks])
            agent.invoke(None, thread, context=cfg)
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
                context=cfg,
            )
        final = agent.get_state(thread)
    if final.tasks or "status" not in final.values:
        # Never mark an unfinished run done: the next --resume must pick it up again.
        raise RuntimeError(f"sample {thread_id} stopped before finalize (pending: {[t.name for t in final.tasks]})")
    return dict(final.values)


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

    The joint files are written even when a sample raises (they then describe what is done), and
    each input error is logged as one warning line; input errors never stop the batch.

    Only one batch at a time writes into a root (see graph.batch_guard); pool workers die with it.

    Args:
        executor: Runs the samples still to do and yields their rows (default: this machine's process
            pool of `workers`); `graph.batch_ray.RayExecutor` runs them on a Ray cluster.

    Returns:
        The summary of every finished sample under `root` (also written to root/summary.json).

    Raises:
        graph.batch_guard.RootBusyError: another batch, or a worker of a killed one, is writing into `root`.
    """
    with hold_root(root / WORK_DIR):
        return _run_batch_held(samples, root, overrides=overrides, workers=workers, resume=resume, progress=progress,
                               executor=executor)


def _run_batch_held(samples: list[Sample], root: Path, *, overrides: dict[str, Any], workers: int, resume: bool,
                    progress: bool, executor: Executor | None) -> dict[str, Any]:
    done = {s.work_dir: row for s in samples if (row := _done_row(s)) is not None}
    for sample in samples:
        if done.get(sample.work_dir, {}).get("status") in RETRY_STATUSES and resume:
            # The endpoint failed, not the sample: start it again from nothing on resume.
            shutil.rmtree(sample.work_dir, ignore_errors=True)
            del done[sample.work_dir]
    started_before = any(Path(s.work_dir).exists() for s in samples)
    if started_before and not resume:
        raise BatchError(f"{root} already holds a batch; pass --resume to finish it, or choose another --out")
    for orphan in root.glob(".*.tmp"):  # a kill while the joint files were being written
        orphan.unlink(missing_ok=True)
    _drop_stale_input_errors(root)
    todo = [s for s in samples if s.work_dir not in done]
    logger.info("%d samples planned, %d already done, %d to run", len(samples), len(done), len(todo))
    started = time.perf_counter()
    try:
        execute = executor or pool_executor(workers, root / WORK_DIR)
        for row in execute(todo, overrides, progress=progress, total=len(samples), initial=len(done)):
            if row["status"] == INPUT_ERROR:
                logger.warning("input error (%s/%s %s): %s", row["category"], row["anomaly_type"], row["name"], row.get("error"))
    finally:
        rows = all_done_rows(root)
        summary = summarise(rows, seconds=time.perf_counter() - started)
        _write_joint_files(rows, root, summary)
    return summary


def _drop_stale_input_errors(root: Path) -> None:
    """Forget input-error samples whose file is gone or now holds other content.

    Why: such a sample produced nothing, and the fixed file is a new sample under its new content,
    so the old record would only count an error the dataset no longer has.
    """
    for marker in (root / WORK_DIR).glob(f"*/*/*/{DONE_FILE}"):
        try:
            row = json.loads(marker.read_text())
        except json.JSONDecodeError:
            continue
        if row.get("status") == INPUT_ERROR and file_digest(Path(row["image"])) != row.get("image_sha256"):
            logger.info("forgetting the input error of %s: the file is gone or changed", row["image"])
            shutil.rmtree(marker.parent, ignore_errors=True)


def all_done_rows(root: Path) -> list[dict[str, Any]]:
    """Every finished sample under `root`, from any batch into it, in (category, type, name) order.

    Why the whole root: one dataset root may be filled by several batches (one per category); its
    summary, trajectories and contact sheet describe the dataset, not the last command.
    """
    rows = []
    for marker in (root / WORK_DIR).glob(f"*/*/*/{DONE_FILE}"):
        try:
            rows.append(json.loads(marker.read_text()))
        except json.JSONDecodeError:
            logger.warning("skipping unreadable marker %s", marker)
    return sorted(rows, key=lambda r: (r["category"], r["anomaly_type"], r.get("name", "")))


def pool_executor(workers: int, work_dir: Path) -> Executor:
    """This machine's executor: `workers` spawned processes (which die with this one and hold
    `work_dir`'s workers lock), or this process alone when `workers` is 1."""
    return partial(_execute, workers=workers, work_dir=work_dir)


def _execute(todo: list[Sample], overrides: dict[str, Any], *, workers: int, work_dir: Path, progress: bool,
             total: int, initial: int) -> Iterator[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc="samples", unit="sample", disable=not progress)
    try:
        if workers <= 1:
            for sample in todo:
                yield run_sample(sample, overrides)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")  # torch and forked threads do not mix
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                 initargs=(os.getpid(), str(work_dir))) as pool:
            futures = [pool.submit(run_sample, sample, overrides) for sample in todo]
            for future in as_completed(futures):
                yield future.result()
                bar.update()
    finally:
        bar.close()


def _init_worker(parent_pid: int, work_dir: str) -> None:
    """Pool-worker setup: die with the batch process, hold the root's workers lock, one torch thread."""
    import torch

    init_worker(parent_pid, work_dir)
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
        "input_errors": [{"image": row["image"], "anomaly_type": row["anomaly_type"], "error": row.get("error")}
                         for row in rows if row["status"] == INPUT_ERROR],
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
            record["sample"] = {"name": row["name"], "image": row["anomaly_out"], "mask": row["mask_out"]}
            lines.append(json.dumps(record))
    write_text_atomic(root / "trajectories.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    write_json_atomic(root / "summary.json", summary)
    sheet_rows = [
        SheetRow(
            normal=row["image"],
            anomaly=row["anomaly_out"],
            mask=row["mask_out"],
            label=f"{row['anomaly_type']} {row['name']}  {row['status']}  score {row['score'] if row['score'] is not None else '-'}",
        )
        for row in rows
        if all(Path(row[key]).is_file() for key in ("image", "anomaly_out", "mask_out"))  # an input may be gone since
    ]
    make_contact_sheet(sheet_rows, root / "contact_sheet.png")

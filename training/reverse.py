"""Reverse synthesis: trajectories whose accepted edit is a real anomaly with its real mask (DESIGN §6).

Why: the scripted teacher almost always passes on its first image, so graph traces teach only the
short path. A policy must also learn to read a failed review and fix its instruction. Real anomaly
datasets (MVTec layout) give the end point of such a path: the real defect. Working backwards, each
staged trajectory has 1, 2 or 3 image_gen calls; the last one returns the real anomaly, and the
earlier ones return degraded versions of it (moved off the object, blended toward the normal,
enlarged, recoloured) whose reviews name what is wrong.

How the messages stay identical to graph runs: each trajectory is a run of the compiled graph with the
scripted expert (its refined instruction applies the review's ``Fixes:`` line and the retrieved
knowledge) and the real tools: PG (template backend), QE (`MetricJudge`, real scores on every image),
KR, and MG (the real change mask of the accepted image, which is what the policy observes). Only
image_gen's backend is replaced, through the toolbox (`graph.toolbox.tools_replaced`), by a
`ReplayImageGenerator` that returns the planned images. A record therefore has the graph's fields, plus
``source: reverse`` and a ``reverse`` section (the plan, the real image, its ground-truth mask and MG's
IoU with it).

A plan is kept only when the run went as staged: every degraded image failed QE, the real one passed,
and the policy masked it. Otherwise the next PG seed or degradation order is tried.

The normal image (image 1): MVTec's normals are other physical parts, not the anomaly's own part
before the defect, so QE would see the whole image changed. If a train/good image matches the
anomaly outside its (dilated) mask, it is used (datasets built from edits, like the tests'); otherwise
the defect is removed by biharmonic inpainting of the dilated mask region, and the record says so.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage as ndi

from tools.dataset_layout import IMAGE_SUFFIXES
from tools.types import BackendUnavailableError, GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

Degradation = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class ReverseError(ValueError):
    """The dataset root is not in MVTec layout or holds no usable anomaly."""


@dataclass(frozen=True)
class RealAnomaly:
    """One real anomaly of an MVTec-layout dataset."""

    category: str
    anomaly_type: str
    image: Path
    mask: Path
    normals: tuple[Path, ...]


# ------------------------------------------------------------------------------------------ dataset


def list_anomalies(root: Path, categories: list[str] | None = None) -> list[RealAnomaly]:
    """Real anomalies with masks under ROOT/C/test/T (T != good), for categories and types the catalog knows.

    Raises:
        ReverseError: nothing usable under `root`.
    """
    from tools.knowledge.catalog import UnknownAnomalyTypeError, UnknownCategoryError, load_catalog

    root = Path(root)
    if not root.is_dir():
        raise ReverseError(f"dataset folder not found: {root}")
    catalog = load_catalog()
    found: list[RealAnomaly] = []
    for category_dir in sorted(p for p in root.iterdir() if (p / "test").is_dir()):
        if categories and category_dir.name not in categories:
            continue
        try:
            category = catalog.category(category_dir.name).name
        except UnknownCategoryError:
            logger.warning("skipping %s: not a category of the knowledge base", category_dir.name)
            continue
        normals = tuple(_images(category_dir / "train" / "good"))
        for type_dir in sorted(p for p in (category_dir / "test").iterdir() if p.is_dir() and p.name != "good"):
            try:
                anomaly_type = catalog.defect(category, type_dir.name).name
            except UnknownAnomalyTypeError:
                logger.warning("skipping %s/%s: not a defect type of %s", category, type_dir.name, category)
                continue
            for image in _images(type_dir):
                mask = category_dir / "ground_truth" / type_dir.name / f"{image.stem}_mask.png"
                if mask.is_file():
                    found.append(RealAnomaly(category, anomaly_type, image, mask, normals))
                else:
                    logger.warning("skipping %s: no ground-truth mask %s", image, mask)
    if not found:
        raise ReverseError(
            f"no anomaly with a mask under {root}: expected ROOT/<category>/test/<type>/NNN.png and "
            "ROOT/<category>/ground_truth/<type>/NNN_mask.png"
        )
    return found


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def pseudo_normal(anomaly: np.ndarray, mask: np.ndarray, normals: list[np.ndarray], tolerance: float = 2.0) -> tuple[np.ndarray, str]:
    """The anomaly's part without its defect: a matching normal if one exists, else an inpainting.

    Args:
        anomaly: uint8 RGB.
        mask: bool (H, W), the defect.
        normals: Candidate normal images (same category).
        tolerance: Largest mean absolute difference (0-255) outside the dilated mask for a match.

    Returns:
        (normal image, "paired" | "inpainted").
    """
    from skimage.restoration import inpaint_biharmonic

    outside = ~ndi.binary_dilation(mask, iterations=3)
    for normal in normals:
        if normal.shape == anomaly.shape and outside.any():
            if float(np.abs(normal.astype(np.float32) - anomaly)[outside].mean()) <= tolerance:
                return normal, "paired"
    grown = ndi.binary_dilation(mask, iterations=2)
    filled = inpaint_biharmonic(anomaly.astype(np.float64) / 255.0, grown, channel_axis=-1)
    return np.clip(np.round(filled * 255.0), 0, 255).astype(np.uint8), "inpainted"


# -------------------------------------------------------------------------------------- degradations


def _alpha(mask: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    grown = ndi.binary_dilation(mask, iterations=1)
    return np.clip(ndi.gaussian_filter(grown.astype(np.float32), sigma) * 1.5, 0.0, 1.0)


def _composite(normal: np.ndarray, source: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = normal.astype(np.float32) * (1.0 - alpha[..., None]) + source.astype(np.float32) * alpha[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def too_faint(normal: np.ndarray, anomaly: np.ndarray, mask: np.ndarray, foreground: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The real defect blended 10-20% of the way from the normal: it barely shows."""
    strength = float(rng.uniform(0.1, 0.2))
    return _composite(normal, anomaly, strength * _alpha(mask)), mask.copy()


def garish(normal: np.ndarray, anomaly: np.ndarray, mask: np.ndarray, foreground: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The real defect painted over with a saturated colour no real defect has."""
    colours = np.array([[255, 0, 255], [0, 255, 60], [0, 90, 255], [255, 230, 0]], np.float32)
    paint = colours[int(rng.integers(0, len(colours)))]
    tinted = 0.25 * anomaly.astype(np.float32) + 0.75 * paint
    return _composite(anomaly, tinted, _alpha(mask, 0.6)), mask.copy()


def _shifted(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(array)
    h, w = array.shape[:2]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = array[ys, xs]
    return out


def wrong_place(normal: np.ndarray, anomaly: np.ndarray, mask: np.ndarray, foreground: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The real defect moved off the object, onto the background (objects only)."""
    background = ~ndi.binary_dilation(foreground, iterations=2)
    if not mask.any() or background.mean() < 0.05:
        raise ValueError("no background to move the defect onto")
    cy, cx = (int(round(v)) for v in ndi.center_of_mass(mask))
    ys, xs = np.nonzero(mask)
    half_h, half_w = (ys.max() - ys.min()) // 2 + 1, (xs.max() - xs.min()) // 2 + 1
    free = ndi.binary_erosion(background, structure=np.ones((2 * half_h + 1, 2 * half_w + 1), bool), border_value=0)
    if not free.any():
        raise ValueError("the background has no room for the defect")
    candidates = np.argwhere(free)
    ty, tx = candidates[int(rng.integers(0, len(candidates)))]
    dy, dx = int(ty - cy), int(tx - cx)
    moved = _shifted(mask, dy, dx)
    return _composite(normal, _shifted(anomaly, dy, dx), _shifted(_alpha(mask), dy, dx)), moved


def too_large(normal: np.ndarray, anomaly: np.ndarray, mask: np.ndarray, foreground: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The real defect scaled up 2.5-3.5x about its centre: far larger than such a defect grows."""
    from skimage.transform import rescale

    factor = float(rng.uniform(2.5, 3.5))
    h, w = mask.shape
    cy, cx = ndi.center_of_mass(mask)
    source = rescale(anomaly.astype(np.float32), factor, order=1, channel_axis=-1, anti_aliasing=False)
    alpha = rescale(_alpha(mask), factor, order=1, anti_aliasing=False)
    oy, ox = int(round(cy * factor - cy)), int(round(cx * factor - cx))
    source, alpha = source[oy : oy + h, ox : ox + w], alpha[oy : oy + h, ox : ox + w]
    pad = ((0, h - source.shape[0]), (0, w - source.shape[1]))
    source = np.pad(source, (*pad, (0, 0)), mode="edge")
    alpha = np.pad(alpha, pad) * foreground
    return _composite(normal, source, alpha), alpha > 0.5


DEGRADATIONS: dict[str, Degradation] = {
    "wrong_place": wrong_place,
    "too_faint": too_faint,
    "too_large": too_large,
    "garish": garish,
}


# --------------------------------------------------------------------------------------------- driver


class ReplayImageGenerator:
    """An `ImageGenerator` that returns the planned images in order, whatever the instruction says.

    Why: a reverse run is a real graph run in which only image_gen is staged; each result carries the
    instruction's parsed spec and the planned region, as the procedural engine's would.
    """

    def __init__(self, replay: list[tuple[np.ndarray, np.ndarray, str]]) -> None:
        self.pending = list(replay)

    def generate(self, image: np.ndarray, request: GenerationRequest) -> GenerationResult:
        """The next planned (image, region); BackendUnavailableError when none is left (the run then ends)."""
        from tools.vocabulary import parse_instruction

        if not self.pending:
            raise BackendUnavailableError("the policy asked for more images than were planned")
        edited, region, label = self.pending.pop(0)
        return GenerationResult(image=edited, region=region, spec=parse_instruction(request.prompt),
                                info={"area_fraction": round(float(region.mean()), 5), "reverse": label})


def drive(
    *,
    normal_path: Path,
    category: str,
    anomaly_type: str,
    replay: list[tuple[np.ndarray, np.ndarray, str]],
    seed: int,
    run_dir: Path,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """Run the compiled graph (scripted expert, real tools) with image_gen replaying `replay` in order.

    Args:
        replay: (image, region, label) per image_gen call, the accepted real anomaly last.
        overrides: The run's ``configurable`` (the policy is the scripted expert).

    Returns:
        The graph's output, with ``result`` written by the graph's finalize step.

    Raises:
        _Diverged: the run left planned images unused.
    """
    from graph.configuration import Configuration
    from graph.graph import build_graph, recursion_limit
    from graph.toolbox import tools_replaced

    generator = ReplayImageGenerator(replay)
    config = Configuration.load(overrides=overrides)
    with tools_replaced(image=generator):
        output = build_graph().invoke(
            {"image": str(normal_path), "category": category, "anomaly_type": anomaly_type, "seed": seed,
             "run_dir": str(run_dir)},
            {"configurable": dict(overrides), "recursion_limit": recursion_limit(config)},
            context=config,
        )
    if generator.pending:
        raise _Diverged(f"the run ended with {len(generator.pending)} planned images unused")
    return output


class _Diverged(RuntimeError):
    """The run did not follow the staged plan."""


def _plans(stage: int, is_texture: bool, rng: np.random.Generator) -> list[list[str]]:
    """Degradation orders to try for a stage (stage - 1 failed attempts), most varied first."""
    kinds = [k for k in DEGRADATIONS if not (is_texture and k == "wrong_place")]
    if stage == 1:
        return [[] for _ in range(8)]  # nothing to degrade: each try draws another PG instruction (seed)
    orders = [list(p) for p in _permutations(kinds, stage - 1)]
    rng.shuffle(orders)  # type: ignore[arg-type]
    return orders


def _permutations(items: list[str], k: int) -> list[tuple[str, ...]]:
    from itertools import permutations

    return list(permutations(items, k))


def synthesize_one(
    anomaly: RealAnomaly,
    stage: int,
    *,
    out_dir: Path,
    seed: int,
    overrides: dict[str, Any],
    max_tries: int = 6,
    size: int | None = None,
) -> dict[str, Any] | None:
    """One staged trajectory for `anomaly` with `stage` image_gen calls, or None if no plan went as staged.

    Returns:
        The trajectory record (as `write_outputs` wrote it, with ``source: reverse`` and the plan).
    """
    import json

    from graph.trajectory import mask_iou
    from tools.foreground import estimate_foreground
    from tools.imaging import load_image, load_mask, save_png_atomic, write_json_atomic
    from tools.knowledge.catalog import load_catalog

    real = load_image(str(anomaly.image))
    gt = load_mask(str(anomaly.mask))
    if size:
        real, gt = _fit(real, gt, size)
    if gt.shape != real.shape[:2] or not gt.any():
        logger.warning("skipping %s: mask empty or of another size", anomaly.image)
        return None
    normals = [_fit(load_image(str(p)), None, size)[0] if size else load_image(str(p)) for p in anomaly.normals]
    normal, normal_source = pseudo_normal(real, gt, normals)
    is_texture = load_catalog().category(anomaly.category).kind == "texture"
    foreground = estimate_foreground(normal, is_texture)
    rng = np.random.default_rng(seed)
    stem = f"{anomaly.category}-{anomaly.anomaly_type}-{anomaly.image.stem}-ig{stage}"
    base = out_dir / stem
    base.mkdir(parents=True, exist_ok=True)
    normal_path = save_png_atomic(normal, base / "normal.png")
    gt_path = save_png_atomic(gt, base / "gt_mask.png")
    for attempt, plan in enumerate(_plans(stage, is_texture, rng)[:max_tries]):
        try:
            replay = [(*DEGRADATIONS[kind](normal, real, gt, foreground, rng), kind) for kind in plan]
        except ValueError as error:
            logger.info("%s: plan %s not possible: %s", stem, plan, error)
            continue
        replay.append((real, gt, "real"))
        run_dir = base / f"try{attempt}"
        run_seed = seed * 7 + attempt
        try:
            output = drive(normal_path=normal_path, category=anomaly.category, anomaly_type=anomaly.anomaly_type,
                           replay=replay, seed=run_seed, run_dir=run_dir, overrides=overrides)
        except _Diverged as why:
            logger.info("%s: plan %s diverged: %s", stem, plan, why)
            shutil.rmtree(run_dir, ignore_errors=True)
            continue
        result = output["result"]
        record = json.loads(Path(result["trajectory_path"]).read_text())
        evaluations = record.get("evaluations") or {}
        numbers = [str(n) for n in range(2, 2 + len(replay))]
        failed_first = all(not evaluations.get(n, {}).get("passed", True) for n in numbers[:-1])
        accepted = result.get("image") == int(numbers[-1]) and evaluations.get(numbers[-1], {}).get("passed")
        if not (failed_first and accepted and output["status"] == "success"):
            logger.info("%s: plan %s did not go as staged (%s)", stem, plan, record.get("calls"))
            shutil.rmtree(run_dir, ignore_errors=True)
            continue
        mg_mask = load_mask(result["mask_path"])
        record["source"] = "reverse"
        record["id"] = stem
        record["reverse"] = {
            "real_image": str(anomaly.image),
            "gt_mask": str(gt_path),
            "normal": str(normal_path),
            "normal_source": normal_source,
            "plan": [*plan, "real"],
            "stage": stage,
            "accepted_mask": "mask_gen",
            "mask_iou_gt": round(mask_iou(mg_mask, gt), 4),
        }
        write_json_atomic(Path(result["trajectory_path"]), record)
        return record
    logger.warning("%s: no plan went as staged after %d tries", stem, max_tries)
    return None


def _fit(image: np.ndarray, mask: np.ndarray | None, size: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize so the longer side is `size` (images bilinear, masks nearest)."""
    from PIL import Image

    if not size or max(image.shape[:2]) == size:
        return image, mask
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize(new, Image.Resampling.BILINEAR))
    if mask is None:
        return resized, None
    return resized, np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(new, Image.Resampling.NEAREST)) > 127


def reverse_synthesize(
    root: Path,
    out: Path,
    *,
    seed: int = 0,
    stages: tuple[int, ...] = (1, 2, 3),
    categories: list[str] | None = None,
    limit: int | None = None,
    size: int | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Staged reverse trajectories for every real anomaly under `root`, written as JSONL to `out`.

    Each anomaly gets one trajectory per stage in `stages`. Images (the normal, degraded attempts, the
    real anomaly, masks) are stored per trajectory under ``<out without .jsonl>_runs/``.

    Returns:
        Counts: anomalies, trajectories written per stage, plans that could not be staged, seconds.
    """
    import json

    from graph.configuration import Configuration
    from tools.imaging import write_text_atomic

    overrides = {**(overrides or {}), "policy": "scripted"}
    config = Configuration.load(overrides=overrides)
    if max(stages) > config.budget.max_image_gens or min(stages) < 1:
        raise ReverseError(f"stages must be between 1 and max_image_gens ({config.budget.max_image_gens}); got {stages}")
    anomalies = list_anomalies(Path(root), categories)
    order = np.random.default_rng(seed).permutation(len(anomalies))
    anomalies = [anomalies[i] for i in order][: limit or None]
    out = Path(out)
    runs = out.with_name(out.name.removesuffix(".jsonl") + "_runs")
    started = time.perf_counter()
    records, missed = [], {s: 0 for s in stages}
    iterator: Any = anomalies
    if progress:
        from tqdm import tqdm

        iterator = tqdm(anomalies, desc="reverse", unit="anomaly")
    for index, anomaly in enumerate(iterator):
        for stage in stages:
            record = synthesize_one(anomaly, stage, out_dir=runs, seed=seed * 100_003 + index * 10 + stage,
                                    overrides=overrides, size=size)
            if record is None:
                missed[stage] += 1
            else:
                records.append(record)
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    per_stage = {s: sum(1 for r in records if r["reverse"]["stage"] == s) for s in stages}
    ious = [r["reverse"]["mask_iou_gt"] for r in records]
    return {"anomalies": len(anomalies), "trajectories": len(records), "per_stage": per_stage, "not_staged": missed,
            "mask_iou_gt_mean": round(float(np.mean(ious)), 4) if ious else None,
            "seconds": round(time.perf_counter() - started, 1), "out": str(out), "images": str(runs)}

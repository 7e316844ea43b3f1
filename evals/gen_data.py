"""Synthetic-anomaly datasets for the evaluation: normal images in, one MVTec-layout root per generator out.

Why every generator writes files: the protocols read what a user would train on (the MVTec layout our
batch writes), through one reader, whatever made the images. The agent's data comes from the real batch
path (`graph.batch.plan` + `run_batch`: scripted policy, embedded backends, resumable); the baselines
run in-process and write the same layout atomically.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evals.eval_cli import GENERATORS
from evals.mvtec_io import Item, write_anomaly, write_normal
from tools.imaging import load_image

logger = logging.getLogger(__name__)

#: The agent is the first generator: its row is the headline.
AGENT = GENERATORS[0]
OPEN_LOOP = "open_loop"
#: Default defect types of the sample categories (types the engine and the catalog know).
DEFAULT_TYPES: dict[str, list[str]] = {
    "tile": ["crack", "oil", "rough"],
    "carpet": ["color", "cut", "hole"],
    "wood": ["color", "scratch", "hole"],
    "metal_nut": ["scratch", "color", "bent"],
    "capsule": ["crack", "poke", "squeeze"],
}


@dataclass
class Generated:
    """What one generator wrote for one set of normals: where, how many, how long, and sheet rows."""

    generator: str
    root: Path
    samples: int
    seconds: float
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # normal, anomaly, mask, label

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def write_sample_normals(
    root: Path,
    categories: list[str],
    train: int,
    test: int,
    size: int,
    seed: int,
    extra_train: int = 0,
    extra_test: int = 0,
) -> None:
    """Normal images from `tools.samples` in the MVTec layout: `train` in train/good, `test` in test/good.

    Train and test images are different variants (indices), so no test normal was seen in training.
    `extra_train` and `extra_test` more of each follow under the next numbers, drawn from variants after all
    of the first ones: adding them never changes the first `train` and `test` images.
    """
    from tools.samples import sample_image

    variants = {
        "train": [*range(train), *range(train + test, train + test + extra_train)],
        "test": [*range(train, train + test), *range(train + test + extra_train, train + test + extra_train + extra_test)],
    }
    for category in categories:
        for split, indices in variants.items():
            for number, i in enumerate(indices):
                write_normal(root, category, split, number, sample_image(category, i, size=size, seed=seed))


def sample_seed(seed: int, generator: str, category: str, anomaly_type: str, number: int) -> int:
    """A sample's seed from its identity alone (reruns and reorderings draw the same sample)."""
    return (seed * 1_000_003 + zlib.crc32(f"{generator}/{category}/{anomaly_type}".encode()) + number) % 2**31


def generate(
    generator: str,
    normals: list[Item],
    category: str,
    types: list[str],
    root: Path,
    seed: int,
    progress: bool = False,
    paired_open_loop: bool = False,
) -> Generated:
    """One anomaly per (normal image, type), written under `root` in the MVTec layout.

    Args:
        generator: `AGENT` or a key of `evals.baselines.BASELINES`.
        normals: The normal images to draw on, in order (sample number = index).
        category: Catalog category (decides texture vs object and the agent's knowledge).
        types: Defect types; each normal gets one anomaly of each.
        root: Output root; ROOT/<category>/test/<type>/NAME.png and ground_truth/<type>/NAME_mask.png (NAME:
            NNN for baselines, graph.batch's content-derived name for the agent).
        seed: Base seed.

    Returns:
        Counts, wall seconds and contact-sheet rows.
    """
    started = time.perf_counter()
    if generator == AGENT:
        rows = _generate_agent(normals, category, types, root, seed, progress)
    elif generator == OPEN_LOOP and paired_open_loop:
        rows = _generate_agent(normals, category, types, root, seed, progress, image_attempts=1, label=OPEN_LOOP)
    else:
        rows = _generate_baseline(generator, normals, category, types, root, seed)
    seconds = time.perf_counter() - started
    logger.info("%s: %d samples of %s in %.1f s", generator, len(rows), category, seconds)
    return Generated(generator, root, len(rows), seconds, rows)


def _generate_agent(
    normals: list[Item],
    category: str,
    types: list[str],
    root: Path,
    seed: int,
    progress: bool,
    image_attempts: int | None = None,
    label: str = AGENT,
) -> list[tuple[str, str, str, str]]:
    """The agent through the real batch path; with `image_attempts` 1, its first image of every run (the
    same samples, seeds and instructions, no second attempt): the open loop paired with the agent."""
    from graph.batch import all_done_rows, plan, run_batch

    samples = plan([n.image for n in normals], category, types, 1, root, seed)
    overrides: dict[str, object] = {"seed": seed}
    if image_attempts is not None:
        overrides["max_image_gens"] = image_attempts
    run_batch(samples, root, overrides=overrides, workers=1, resume=True, progress=progress)
    scores = {(r["category"], r["anomaly_type"], r["name"]): r.get("score") for r in all_done_rows(root)}
    rows = []
    for s in samples:
        if Path(s.anomaly_out).is_file():
            score = scores.get((s.category, s.anomaly_type, s.name))
            text = f"{label} {s.anomaly_type} {s.name}  QE {score if score is not None else '-'}"
            rows.append((s.image, s.anomaly_out, s.mask_out, text))
    return rows


def _generate_baseline(
    name: str, normals: list[Item], category: str, types: list[str], root: Path, seed: int
) -> list[tuple[str, str, str, str]]:
    from evals.baselines import make_baseline

    baseline = make_baseline(name)
    rows = []
    for anomaly_type in types:
        for number, normal in enumerate(normals):
            rng = np.random.default_rng(sample_seed(seed, name, category, anomaly_type, number))
            out = baseline(load_image(normal.image), category, anomaly_type, rng)
            item = write_anomaly(root, category, anomaly_type, number, out.image, out.mask)
            rows.append(
                (str(normal.image), str(item.image), str(item.mask), f"{name} {anomaly_type} #{number:03d}")
            )
    return rows

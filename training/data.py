"""Make the SFT data: scripted graph runs over sample images plus reverse trajectories, disjoint from eval tasks.

    anomaly-agent trajectories sft-data --out out/sft-data     # 300 trajectories (240 graph + 60 reverse), ~15 min on 2 cores

Held-out split: `anomaly-agent eval policy` draws its tasks from sample images made with its ``--seed``
(default 0: `tools.samples.make_samples(seed=0)`, images 0 and 1 of each category) and run seeds
``seed*1000 + i``. Training images here come from other sample seeds (`TRAIN_SAMPLE_SEED` for graph
runs, `REVERSE_SAMPLE_SEED` for the reverse dataset), and the script checks by content hash that none
of them is an eval image for the eval seeds in `HELD_OUT_EVAL_SEEDS`. The split is written to
``heldout.json``. Categories and defect types are shared (there are five sample categories); images,
defect draws and run seeds are not.

Writes under --out: ``samples/`` (normals), ``graph/`` (batch root: MVTec outputs, trajectories.jsonl),
``mvtec_like/`` (the "real" anomaly dataset), ``reverse.jsonl`` + ``reverse_runs/``, and the export:
``trajectories.jsonl`` and ``hf_dataset/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRAIN_SAMPLE_SEED = 1
REVERSE_SAMPLE_SEED = 3
GRAPH_BATCH_SEED = 11
HELD_OUT_EVAL_SEEDS = (0,)
EVAL_IMAGES_PER_CATEGORY = 2  # graph.tasks.make_tasks: make_samples(per_category=2)


def category_types() -> dict[str, list[str]]:
    """Every sample category with every defect type the knowledge base lists for it."""
    from tools.knowledge.catalog import load_catalog
    from tools.samples import SAMPLE_CATEGORIES

    catalog = load_catalog()
    return {c: list(catalog.category(c).defects) for c in SAMPLE_CATEGORIES}


def eval_image_hashes(size: int, seeds: tuple[int, ...] = HELD_OUT_EVAL_SEEDS) -> set[str]:
    """Content ids of the images `eval policy --seed S --size size` uses, for each S."""
    from tools.image_store import content_id
    from tools.samples import SAMPLE_CATEGORIES, sample_image

    return {content_id(sample_image(c, i, size=size, seed=s))
            for s in seeds for c in SAMPLE_CATEGORIES for i in range(EVAL_IMAGES_PER_CATEGORY)}


def check_disjoint(images: list[Path], held_out: set[str]) -> None:
    """Raise if any training image is one of the held-out eval images."""
    from tools.image_store import content_id
    from tools.imaging import load_image

    clashes = [str(p) for p in images if content_id(load_image(str(p))) in held_out]
    if clashes:
        raise RuntimeError(f"training images overlap the eval tasks: {clashes[:3]}")


def make_data(out: Path, *, images_per_category: int = 10, reverse_per_type: int = 2,
              reverse_stages: tuple[int, ...] = (2, 3), max_reverse: int | None = 60, size: int = 128,
              workers: int = 1) -> dict[str, Any]:
    """Run everything (resumable: the graph batch resumes, finished steps are not redone).

    Args:
        max_reverse: Reverse trajectories kept in the export (None: all). The default, 60 with the 240
            graph runs of 10 images x 24 types, gives the 300-trajectory set the SFT benchmark uses.
    """
    from graph.batch import list_images, plan, run_batch
    from tools.samples import make_samples
    from training.reverse import reverse_synthesize
    from training.synthetic_mvtec import build_mvtec_like
    from training.trajectories import export_records

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    types = category_types()
    held_out = eval_image_hashes(size)

    samples = out / "samples"
    make_samples(samples, size=size, per_category=images_per_category, seed=TRAIN_SAMPLE_SEED)
    graph_root = (out / "graph").resolve()
    for category, names in types.items():
        images = list_images(samples / category)
        check_disjoint(images, held_out)
        batch = plan(images, category, names, 1, graph_root, GRAPH_BATCH_SEED)
        run_batch(batch, graph_root, overrides={"policy": "scripted"}, workers=workers, resume=True, progress=sys.stderr.isatty())

    mvtec = out / "mvtec_like"
    if not any(mvtec.glob("*/test/*/*.png")):
        build_mvtec_like(mvtec, types, per_type=reverse_per_type, size=size, seed=REVERSE_SAMPLE_SEED)
    check_disjoint(sorted(mvtec.glob("*/train/good/*.png")), held_out)
    reverse_jsonl = out / "reverse.jsonl"
    reverse = json.loads((out / "reverse_summary.json").read_text()) if (out / "reverse_summary.json").is_file() else None
    if reverse is None or not reverse_jsonl.is_file():
        reverse = reverse_synthesize(mvtec, reverse_jsonl, seed=1, stages=reverse_stages, progress=sys.stderr.isatty())
        (out / "reverse_summary.json").write_text(json.dumps(reverse, indent=1))

    reverse_lines = reverse_jsonl.read_text().splitlines()
    if max_reverse is not None and len(reverse_lines) > max_reverse:
        # The file lists each anomaly's stages together, so its head keeps the stages balanced.
        reverse_jsonl = out / f"reverse_first{max_reverse}.jsonl"
        reverse_jsonl.write_text("".join(line + "\n" for line in reverse_lines[:max_reverse]))
    exported = export_records([graph_root, reverse_jsonl], out / "trajectories.jsonl", hf_dataset=out / "hf_dataset")
    split = {
        "train": {"graph_sample_seed": TRAIN_SAMPLE_SEED, "graph_batch_seed": GRAPH_BATCH_SEED,
                  "reverse_sample_seed": REVERSE_SAMPLE_SEED, "images_per_category": images_per_category},
        "held_out": {"eval_policy_seeds": list(HELD_OUT_EVAL_SEEDS), "size": size,
                     "note": "anomaly-agent eval policy --seed S uses make_samples(seed=S, per_category=2); "
                             "no training image equals one of them (checked by content hash)"},
        "trajectories": exported,
        "reverse": reverse,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "heldout.json").write_text(json.dumps(split, indent=1))
    return split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomaly-agent trajectories sft-data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--images-per-category", type=int, default=10)
    parser.add_argument("--reverse-per-type", type=int, default=2)
    parser.add_argument("--reverse-stages", default="2,3")
    parser.add_argument("--max-reverse", type=int, default=60, help="reverse trajectories kept in the export")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    split = make_data(Path(args.out), images_per_category=args.images_per_category, reverse_per_type=args.reverse_per_type,
                      reverse_stages=tuple(int(s) for s in args.reverse_stages.split(",")), max_reverse=args.max_reverse,
                      workers=args.workers)
    print(json.dumps(split["trajectories"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

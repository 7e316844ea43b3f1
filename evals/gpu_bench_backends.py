"""Seconds per sample and peak GPU memory of the production image backends (IG diffusers + MG SAM).

Why a separate benchmark: `make bench` times the embedded CPU backends; on a GPU machine the cost is
the diffusion pipeline and SAM. This runs N tasks (normal sample image × category × defect type, the
agent's own template instruction) through exactly the backends the graph builds from the same
configuration keys, timing IG (plan + inpaint + paste) and MG (change mask + SAM) per sample, with one
warm-up task left out of the figures.

Models: real ones from local paths (``--diffusion-model PATH``, ``--sam-checkpoint PATH``), or, on a
machine without weights, random-weight models of the production architectures written to a temporary
folder first (``--random-sd full`` = SD 1.5 inpainting at 512 px; ``--random-sam vit_b|vit_l|vit_h``):
the compute is that of the published models, the images are noise.

Needs only torch, diffusers, transformers, segment-anything, numpy, pillow, scipy, scikit-image, pyyaml
and pydantic (no langgraph, chromadb or torchvision). Examples:

    anomaly-agent bench gpu-backends --random-sd full --random-sam vit_h --tasks 8 --size 1024
    anomaly-agent bench gpu-backends --diffusion-model ~/models/sd-inpainting \\
        --sam-checkpoint ~/models/sam_vit_h_4b8939.pth --tasks 20 --steps 30
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: (category, defect type) pairs of the sample images, cycled over the tasks.
TASKS: list[tuple[str, str]] = [
    ("metal_nut", "scratch"), ("tile", "crack"), ("capsule", "poke"), ("carpet", "color"),
    ("wood", "hole"), ("metal_nut", "color"), ("tile", "oil"), ("capsule", "crack"),
]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_tasks(n: int, size: int, seed: int) -> list[dict[str, Any]]:
    """N tasks: a normal sample image, category, type, and the template instruction for them."""
    from tools.knowledge.catalog import load_catalog
    from tools.prompt_gen import TemplatePromptGenerator
    from tools.samples import SAMPLE_CATEGORIES, sample_image
    from tools.types import GenerationRequest, PromptRequest

    catalog, pg = load_catalog(), TemplatePromptGenerator()
    tasks = []
    for i in range(n):
        category, anomaly_type = TASKS[i % len(TASKS)]
        cat = catalog.category(category)
        defect = catalog.defect(cat.name, anomaly_type)
        prompt = pg.generate(PromptRequest(category=cat.name, anomaly_type=defect.name, subject=cat.subject,
                                           knowledge=[catalog.entry(cat.name, defect.name)], seed=seed + i))
        tasks.append({
            "image": sample_image(category, i // len(TASKS), size, seed),
            "request": GenerationRequest(prompt=prompt, category=cat.name, anomaly_type=defect.name,
                                         is_texture=SAMPLE_CATEGORIES[category] == "texture",
                                         default_shape=defect.shape, region=defect.region, seed=seed + i),
        })
    return tasks


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tools.image_gen_diffusers import DiffusersInpainter
    from tools.mask_gen_sam import SamMaskGenerator

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    model_path, sam_path = args.diffusion_model, args.sam_checkpoint
    started = time.perf_counter()
    if model_path is None:
        from evals.random_backends import sd_inpaint_pipeline, sdxl_inpaint_pipeline

        folder = work / f"random-sd-{args.random_sd}"
        family, _, size = args.random_sd.rpartition("-") if args.random_sd.startswith("xl") else ("sd", "", args.random_sd)
        build = sdxl_inpaint_pipeline if family == "xl" else sd_inpaint_pipeline
        model_path = str(folder if (folder / "model_index.json").is_file() else build(folder, size=size or "full"))
    if sam_path is None:
        from evals.random_backends import sam_checkpoint

        path = work / f"random-sam-{args.random_sam}.pth"
        sam_path = str(path if path.is_file() else sam_checkpoint(path, args.random_sam))
    build_s = time.perf_counter() - started

    started = time.perf_counter()
    ig = DiffusersInpainter(model_path=model_path, strength=args.strength, steps=args.steps, guidance=args.guidance,
                            resolution=args.resolution, device=args.device, dtype=args.dtype)
    mg = SamMaskGenerator(sam_path, args.sam_model_type, args.device)
    _sync()
    load_s = time.perf_counter() - started
    tasks = build_tasks(args.tasks + 1, args.size, args.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for i, task in enumerate(tasks):
        t0 = time.perf_counter()
        result = ig.generate(task["image"], task["request"])
        _sync()
        t1 = time.perf_counter()
        mask = mg.generate(task["image"], result.image)
        _sync()
        t2 = time.perf_counter()
        assert result.image.shape == task["image"].shape, "IG changed the image size"
        rows.append({"task": i, "category": task["request"].category, "type": task["request"].anomaly_type,
                     "ig_s": t1 - t0, "mg_s": t2 - t1, "pipeline_s": result.info["seconds"],
                     "model_size": result.info["model_size"], "mask_area": mask.area_fraction,
                     "sam": mask.info.get("sam"), "warmup": i == 0})
        logger.info("task %d %s/%s: IG %.2fs (pipeline %.2fs) MG %.2fs mask %.4f (%s)", i, rows[-1]["category"],
                    rows[-1]["type"], rows[-1]["ig_s"], rows[-1]["pipeline_s"], rows[-1]["mg_s"],
                    rows[-1]["mask_area"], rows[-1]["sam"])
    timed = [r for r in rows if not r["warmup"]]
    pipe = ig.pipe
    summary = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "pipeline": type(pipe).__name__,
        "model": "random " + args.random_sd if args.diffusion_model is None else model_path,
        "sam": ("random " + args.random_sam) if args.sam_checkpoint is None else sam_path,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "input_size": args.size,
        "model_size": timed[0]["model_size"] if timed else None,
        "steps": args.steps,
        "strength": args.strength,
        "tasks": len(timed),
        "ig_s_per_sample": statistics.mean(r["ig_s"] for r in timed),
        "mg_s_per_sample": statistics.mean(r["mg_s"] for r in timed),
        "s_per_sample": statistics.mean(r["ig_s"] + r["mg_s"] for r in timed),
        "pipeline_s_per_sample": statistics.mean(r["pipeline_s"] for r in timed),
        "pipeline_s_per_step": statistics.mean(r["pipeline_s"] for r in timed) / max(1, int(args.steps * args.strength)),
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "build_random_s": build_s,
        "load_s": load_s,
        "empty_masks": sum(r["mask_area"] == 0 for r in timed),
    }
    return {"summary": summary, "rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusion-model", help="local diffusers inpainting folder (default: random weights)")
    parser.add_argument("--random-sd", choices=["tiny", "full", "xl-tiny", "xl-full"], default="full",
                        help="random-weight inpainting model: SD 1.5 (tiny/full) or SDXL (xl-tiny/xl-full) architecture")
    parser.add_argument("--sam-checkpoint", help="local SAM checkpoint (default: random weights)")
    parser.add_argument("--random-sam", choices=["tiny", "vit_b", "vit_l", "vit_h"], default="vit_b")
    parser.add_argument("--sam-model-type", default="auto", choices=["auto", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--tasks", type=int, default=8, help="timed tasks (one more runs first as warm-up)")
    parser.add_argument("--size", type=int, default=1024, help="side of the normal input images")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--resolution", type=int, default=None, help="long side sent to the pipeline (default native)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the random models (reused when they are already there)")
    parser.add_argument("--out", help="write the summary and per-task rows as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("diffusers", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse_args(argv)
    report = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

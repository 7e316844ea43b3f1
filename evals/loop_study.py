"""Closed loop vs open loop: does QE-driven refinement improve what the agent returns?

Run: ``python -m evals.loop_study [--per-type 1] [--size 256] [--conditions default,reseed,timid,oversize,blind,clean]``.

Every MVTec-AD and VisA (category, type) runs through the real graph (`graph.graph.build_graph`, scripted
policy, default budget: 10 steps, 3 image generations) on a sample image standing in for its category.
*Open loop* is what a single IG call would have given: the first attempt's QE verdict. *Closed loop* is
the run's final answer: success when it masked an image that passed QE. The table gives both pass rates,
the mean QE score of the first and the last attempt, how many runs refined at all, and how often a
refinement raised the score; a second table gives the same per family.

The embedded engine samples each look from wide ranges (size, contrast, softness, interior), so on its
defaults many first attempts are too faint for their surface, too large for their type or busier inside
than the camera: the loop's work. To show what the loop does when the image backend falls short in one
known way, four more conditions wrap the engine in a deliberately flawed backend, each one a failure QE
must name and the vocabulary can fix:

* timid: the backend under-delivers: "low" contrast gives 6% of the change, "medium" 15% (too faint;
  QE asks for contrast up);
* oversize: size words draw 3x too big, "tiny" excepted (too large; QE asks for a smaller size);
* clean: the backend wipes the camera's noise from inside the defect unless the instruction asks for the
  image's own grain (a camera mismatch; QE asks for noise=match);
* blind: the backend does not know where the product is and draws "anywhere"/"edge" defects on a band
  straddling the product's outline; position words such as "center" put them on the product (off the
  object; QE asks for position=center). Objects only (a texture has no outside).

The wrappers replace only the image backend of the toolbox in this process; policy, PG, QE, KR and MG
are the real ones.

One control separates "better" from "different": *reseed* runs the default backend with a policy that
keeps the failed instruction word for word on a retry (only IG's seed changes), so whatever the default
condition gains over it comes from the review's fixes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("LANGSMITH_TRACING", "false")

CONDITIONS = ("default", "reseed", "timid", "oversize", "blind", "clean")


class TimidBackend:
    """The engine with its change scaled down unless the contrast word is "high"."""

    SCALE = {"low": 0.06, "medium": 0.15, "high": 1.0}

    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(self, image: np.ndarray, request):
        result = self.engine.generate(image, request)
        k = self.SCALE.get(result.spec.contrast if result.spec else "medium", 1.0)
        if k < 1.0:
            edited = image.astype(np.float32) + (result.image.astype(np.float32) - image) * k
            result = dataclasses.replace(result, image=np.clip(np.round(edited), 0, 255).astype(np.uint8))
            result.info["timid_scale"] = k
        return result


class OversizeBackend:
    """The engine drawing every size word but "tiny" three times too big."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(self, image: np.ndarray, request):
        from tools.image_gen import appearance

        saved = dict(appearance.SIZE_RANGE)
        try:
            for word in ("small", "medium", "large"):
                lo, hi = saved[word]
                appearance.SIZE_RANGE[word] = (lo * 3.0, hi * 3.0)
            return self.engine.generate(image, request)
        finally:
            appearance.SIZE_RANGE.clear()
            appearance.SIZE_RANGE.update(saved)


class CleanBackend:
    """The engine with the camera's noise wiped from inside the defect, unless the instruction asks for the
    image's own grain (as an inpainting model that smooths what it paints unless told otherwise)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(self, image: np.ndarray, request):
        result = self.engine.generate(image, request)
        if result.spec is not None and result.spec.noise == "match":
            return result
        inside = ndi.binary_dilation(result.region, iterations=1)
        smooth = ndi.gaussian_filter(result.image.astype(np.float32), (1.2, 1.2, 0))
        edited = result.image.copy()
        edited[inside] = np.clip(np.round(smooth[inside]), 0, 255).astype(np.uint8)
        return dataclasses.replace(result, image=edited)


class BlindBackend:
    """The engine drawing "anywhere"/"edge" defects on a band across the product's outline."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def generate(self, image: np.ndarray, request):
        from tools.vocabulary import parse_instruction

        spec = parse_instruction(request.prompt, default_shape=request.default_shape)
        if request.is_texture or spec.position not in ("anywhere", "edge"):
            return self.engine.generate(image, request)
        fg = self.engine.foreground(image, False)
        width = max(3, int(0.06 * np.sqrt(fg.sum())))
        band = ndi.binary_dilation(fg, iterations=width) & ~ndi.binary_erosion(fg, iterations=width // 2)
        request = request.model_copy(update={"region": None})
        return self.engine.generate(image, request, foreground=band)


#: The scripted policy's own refinement, kept while the reseed control replaces it.
_ORIGINAL: dict = {}


def _keep_prompt(state, evaluation) -> str:
    """The reseed control's refinement: the failed instruction, word for word."""
    return state["prompt"]


def _install_backend(condition: str) -> None:
    """Make the graph's toolbox use the condition's image backend, and the policy keep or refine a
    failed instruction (this process only)."""
    import graph.nodes as nodes
    from graph.toolbox import get_toolbox

    import graph.policies.scripted as scripted

    _ORIGINAL.setdefault("refine_prompt", scripted.refine_prompt)
    scripted.refine_prompt = _keep_prompt if condition == "reseed" else _ORIGINAL["refine_prompt"]
    if condition in ("default", "reseed"):
        nodes.get_toolbox = get_toolbox
        return
    wrapper = {"timid": TimidBackend, "oversize": OversizeBackend, "blind": BlindBackend, "clean": CleanBackend}[condition]

    def patched(cfg):
        box = get_toolbox(cfg)
        return dataclasses.replace(box, image=wrapper(box.image))

    nodes.get_toolbox = patched


def run_condition(condition: str, pairs: list[tuple[str, str]], size: int, per_type: int, work: Path) -> list[dict]:
    """Run the graph over `pairs` under one condition; one row per run."""
    from evals.synth import normal_for
    from graph.configuration import Configuration
    from graph.graph import build_graph, recursion_limit
    from tools.imaging import save_png_atomic
    from tools.knowledge.catalog import load_catalog

    _install_backend(condition)
    agent = build_graph()
    limit = recursion_limit(Configuration())
    catalog = load_catalog()
    rows = []
    # Each run's seed comes from the pair's place in the whole catalog, so a subset repeats its runs.
    index = {pair: k for k, pair in enumerate(catalog.pairs())}
    for category, anomaly_type in pairs:
        k = index[(category, anomaly_type)]
        is_texture = catalog.category(category).is_texture
        if condition == "blind" and is_texture:
            continue
        for i in range(per_type):
            path = work / "normals" / f"{category}_{i}.png"
            if not path.exists():
                save_png_atomic(normal_for(category, i, size=size, seed=11), path)
            run_dir = work / condition / f"{category}-{anomaly_type}-{i}"
            started = time.perf_counter()
            state = agent.invoke(
                {"image": str(path), "category": category, "anomaly_type": anomaly_type, "seed": 1000 * k + i,
                 "run_dir": str(run_dir)},
                {"recursion_limit": limit},
            )
            seconds = time.perf_counter() - started
            record = json.loads(Path(state["result"]["trajectory_path"]).read_text())
            evals = record["evaluations"]
            order = sorted(evals, key=int)
            scores = [evals[n]["location"] + evals[n]["quality"] for n in order]
            first_review = evals[order[0]]["review"] if order else ""
            rows.append({
                "condition": condition, "category": category, "anomaly_type": anomaly_type,
                "family": catalog.entry(category, anomaly_type).family,
                "attempts": len(order), "open_pass": bool(order and evals[order[0]]["passed"]),
                "closed_pass": state["status"] == "success", "status": state["status"],
                "first": scores[0] if scores else 0.0, "last": scores[-1] if scores else 0.0,
                "final": state["result"].get("score", 0.0), "steps": record["calls"],
                "mask_iou": state["result"].get("mask_iou"),
                "first_review": first_review, "seconds": seconds,
                "fixes": [ev.get("fixes", []) for ev in (evals[n] for n in order)],
            })
    _install_backend("default")
    return rows


def summarize(rows: list[dict], out=sys.stdout) -> dict:
    """Print the table; return its numbers per condition."""
    table = {}
    header = (f"{'condition':<10} {'runs':>5} {'open pass':>10} {'closed pass':>12} {'refined':>8} "
              f"{'improved':>9} {'QE first':>9} {'QE last':>8} {'s/run':>6}")
    print(header, file=out)
    for condition in dict.fromkeys(r["condition"] for r in rows):
        rs = [r for r in rows if r["condition"] == condition]
        refined = [r for r in rs if r["attempts"] > 1]
        improved = [r for r in refined if r["last"] > r["first"]]
        entry = {
            "runs": len(rs),
            "open_pass": float(np.mean([r["open_pass"] for r in rs])),
            "closed_pass": float(np.mean([r["closed_pass"] for r in rs])),
            "refined": len(refined),
            "improved": len(improved),
            "first": statistics.fmean(r["first"] for r in rs),
            "last": statistics.fmean(r["last"] for r in rs),
            "seconds": statistics.median(r["seconds"] for r in rs),
        }
        table[condition] = entry
        print(f"{condition:<10} {entry['runs']:>5} {100 * entry['open_pass']:>9.1f}% {100 * entry['closed_pass']:>11.1f}% "
              f"{entry['refined']:>8} {entry['improved']:>9} {entry['first']:>9.2f} {entry['last']:>8.2f} "
              f"{entry['seconds']:>6.2f}", file=out)
    table["per_family"] = per_family_table(rows, out)
    default = [r for r in rows if r["condition"] == "default" and r.get("mask_iou") is not None]
    if default:
        families = sorted({r["family"] for r in default})
        per_family = {f: statistics.fmean(r["mask_iou"] for r in default if r["family"] == f) for f in families}
        print("final mask IoU (MG vs engine region), default condition: "
              + ", ".join(f"{f} {v:.3f}" for f, v in per_family.items())
              + f"; mean over families {statistics.fmean(per_family.values()):.3f}", file=out)
        table["mask_iou_per_family"] = per_family
    return table


def per_family_table(rows: list[dict], out=sys.stdout) -> dict:
    """Per condition and family: first attempts that failed QE, refinements that raised the score, and
    the mean QE score of the first and the last attempt (over the refined runs, where the loop acted)."""
    result: dict = {}
    print(f"{'condition':<10} {'family':<12} {'runs':>5} {'first failed':>13} {'refined':>8} {'raised':>7} "
          f"{'first (refined)':>16} {'last (refined)':>15}", file=out)
    for condition in dict.fromkeys(r["condition"] for r in rows):
        for family in sorted({r["family"] for r in rows if r["condition"] == condition}):
            rs = [r for r in rows if r["condition"] == condition and r["family"] == family]
            refined = [r for r in rs if r["attempts"] > 1]
            entry = {
                "runs": len(rs),
                "first_failed": sum(not r["open_pass"] for r in rs),
                "refined": len(refined),
                "raised": sum(r["last"] > r["first"] for r in refined),
                "first": statistics.fmean(r["first"] for r in refined) if refined else None,
                "last": statistics.fmean(r["last"] for r in refined) if refined else None,
            }
            result[(condition, family)] = entry
            scores = (f"{entry['first']:>16.2f} {entry['last']:>15.2f}" if refined else f"{'-':>16} {'-':>15}")
            print(f"{condition:<10} {family:<12} {entry['runs']:>5} {entry['first_failed']:>13} {entry['refined']:>8} "
                  f"{entry['raised']:>7} {scores}", file=out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loop_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-type", type=int, default=1, help="runs per (category, type) (default 1)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated, from {CONDITIONS}")
    parser.add_argument("--dataset", default=None, help="mvtec_ad or visa (default: both)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N types (0: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's row here")
    args = parser.parse_args(argv)
    from tools.knowledge.catalog import load_catalog

    pairs = load_catalog().pairs(args.dataset)
    if args.limit:
        pairs = pairs[: args.limit]
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        parser.error(f"unknown conditions {sorted(unknown)}; choose from {CONDITIONS}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="loop_study_") as tmp:
        for condition in conditions:
            rows += run_condition(condition, pairs, args.size, args.per_type, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    summarize(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

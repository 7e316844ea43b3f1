"""`anomaly-agent eval transfer`: does a detector trained on generator G's anomalies find anomalies G never made?

For every row G and detector seed: a small fully convolutional detector (`evals.transfer_detector`) trains
on the training normals plus G's training anomalies, then is tested on each held-out source
(`evals.transfer_data.held_out_sources`): every other generator's anomalies on held-out normals (the
agent and the open loop share an engine, so neither is tested on the other's) and the engine's family-F
defects for every family F; the two engine rows are tested on those by one more detector per family,
trained without F. Every test anomaly covers at least QE's resolution floor.
Per source and category: image AUROC and AP of the held-out normals against the source's anomalies, every
image in every stored format (PNG, JPEG); per source: the mean over categories; per row and seed: the
mean over sources; per row: mean and standard deviation over all detectors of all data draws (the data
set is drawn anew `data_draws` times: normals, every generator's output, the test sets). The agent's gain
over the open loop is paired (same detector seeds, same test sets); its standard error is taken over data
draws, since the gain moves more between draws of the data than between detector seeds.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from evals.metrics import auroc, average_precision
from evals.mvtec_io import GOOD
from evals.transfer_config import ENGINE_ROWS, OPEN_LOOP, TransferConfig

logger = logging.getLogger(__name__)

AGENT = "agent"


def is_lofo(source: str) -> bool:
    """Whether a test source is one of the engine's left-out-family sets."""
    from evals.transfer_data import ENGINE

    return source.startswith(f"{ENGINE}:")


def category_metrics(normal_scores: np.ndarray, anomaly_scores: np.ndarray) -> dict[str, float]:
    """Image AUROC and AP of one category: normals are negatives, anomalies positives."""
    scores = np.r_[np.ravel(normal_scores), np.ravel(anomaly_scores)]
    labels = np.r_[np.zeros(np.size(normal_scores), bool), np.ones(np.size(anomaly_scores), bool)]
    return {"auroc": auroc(scores, labels), "ap": average_precision(scores, labels)}


def source_metrics(
    normal_scores: dict[str, dict[str, np.ndarray]], anomaly_scores: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any]:
    """One test source's metrics from image scores {category: {format: scores}}.

    Returns:
        auroc and ap (means over the source's categories, every format pooled), per_category AUROC and
        per_format AUROC (mean over categories of that format alone).
    """
    per_cat = {
        c: category_metrics(
            np.concatenate([normal_scores[c][f] for f in by_fmt]), np.concatenate(list(by_fmt.values()))
        )
        for c, by_fmt in anomaly_scores.items()
    }
    formats = sorted({f for by_fmt in anomaly_scores.values() for f in by_fmt})
    return {
        "auroc": float(np.mean([m["auroc"] for m in per_cat.values()])),
        "ap": float(np.mean([m["ap"] for m in per_cat.values()])),
        "per_category": {c: m["auroc"] for c, m in per_cat.items()},
        "per_format": {
            f: float(np.mean([category_metrics(normal_scores[c][f], s[f])["auroc"] for c, s in anomaly_scores.items()]))
            for f in formats
        },
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over paired seeds, its standard error (sample std / sqrt(n)) and their ratio."""
    d = np.asarray(a, float) - np.asarray(b, float)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    mean = float(d.mean())
    return {"mean": mean, "se": se, "z": mean / se if se and np.isfinite(se) and se > 0 else float("nan"),
            "seeds": int(d.size)}


def clustered_difference(a: list[float], b: list[float], draws: list[int]) -> dict[str, float]:
    """Mean of a - b over paired runs and its standard error over data draws.

    Each draw's mean difference (over its detector seeds) is one observation; the standard error is their
    sample std / sqrt(draws). With one draw there is nothing to take it over: the standard error is then
    the one over detector seeds alone (`paired_difference`), which leaves the data's own variation out.
    `se_detectors` is always that one, for comparison.
    """
    d = np.asarray(a, float) - np.asarray(b, float)
    by_draw = [float(d[np.asarray(draws) == g].mean()) for g in dict.fromkeys(draws)]
    within = paired_difference(a, b)
    if len(by_draw) < 2:
        return {**within, "draws": 1, "se_detectors": within["se"], "per_draw": by_draw}
    se = float(np.std(by_draw, ddof=1) / np.sqrt(len(by_draw)))
    mean = float(np.mean(by_draw))
    return {"mean": mean, "se": se, "z": mean / se if se > 0 else float("nan"), "seeds": int(d.size),
            "draws": len(by_draw), "se_detectors": within["se"], "per_draw": by_draw}


def _detector_seed(cfg: TransferConfig, k: int) -> int:
    return cfg.seed * 1000 + k


def evaluate(cfg: TransferConfig, data, images) -> dict[str, list[dict[str, dict[str, Any]]]]:
    """{row: [per seed {source: metrics}]}; one detector per (row, seed, family left out or none)."""
    from tqdm import tqdm

    from evals.transfer_data import camera_formats, held_out_sources, training_items
    from evals.transfer_detector import score, train_detector

    formats = camera_formats(cfg.split.jpeg_qualities)
    plans = {g: held_out_sources(g, data, cfg.generators) for g in cfg.generators}
    trainings = {g: [None, *sorted({f for f in plans[g].values() if f})] for g in cfg.generators}
    bar = tqdm(
        total=cfg.detector_seeds * sum(len(t) for t in trainings.values()),
        desc="train detectors",
        unit="detector",
        disable=not cfg.progress,
    )
    results: dict[str, list[dict[str, dict[str, Any]]]] = {g: [] for g in cfg.generators}

    def scores_of(model, by_cat: dict[str, dict[str, list]]) -> dict[str, dict[str, np.ndarray]]:
        return {
            c: {f: score(model, [images.image(i) for i in by_fmt[f]], cfg.detector.pool) for f in formats}
            for c, by_fmt in by_cat.items()
        }

    for k in range(cfg.detector_seeds):
        for gen in cfg.generators:
            per_source: dict[str, dict[str, Any]] = {}
            for leave_out in trainings[gen]:
                normals, anomalies = training_items(data, gen, leave_out)
                model = train_detector(
                    [images.image(i) for i in normals],
                    [images.image(i) for i in anomalies],
                    [images.mask(i) for i in anomalies],
                    cfg.detector,
                    _detector_seed(cfg, k),
                )
                normal_scores = scores_of(model, data.camera[GOOD])
                for source, left_out in plans[gen].items():
                    if left_out == leave_out:
                        per_source[source] = source_metrics(normal_scores, scores_of(model, data.camera[source]))
                bar.update()
            results[gen].append(per_source)
    bar.close()
    return results


def summarize(
    cfg: TransferConfig, runs: dict[str, list], results: dict[str, list[dict[str, dict[str, Any]]]], draws: list[int]
) -> dict[str, Any]:
    """Rows (mean ± std over detectors of the mean over sources), per-source AUROC, the agent's gain.

    Args:
        runs: Every row's generator runs (all draws), for samples/s.
        results: {row: [per detector {source: metrics}]}, the detectors of every draw in turn.
        draws: The data seed of each detector, in the same order.
    """
    rows: dict[str, dict[str, Any]] = {}
    for gen, seeds in results.items():
        per_seed_auroc = [float(np.mean([m["auroc"] for m in s.values()])) for s in seeds]
        per_seed_ap = [float(np.mean([m["ap"] for m in s.values()])) for s in seeds]
        # The same mean over the other generators' sources only (the engine:F sets left out), a set every row has.
        per_seed_gen = [float(np.mean([m["auroc"] for k, m in s.items() if not is_lofo(k)])) for s in seeds]
        samples = sum(r.samples for r in runs[gen])
        a, a_sd = mean_std(per_seed_auroc)
        p, p_sd = mean_std(per_seed_ap)
        # A draw may lose an engine:F set (no defect left above the resolution floor): each source over the
        # detectors that tested on it.
        sources = {src: [s[src] for s in seeds if src in s] for src in dict.fromkeys(k for s in seeds for k in s)}
        rows[gen] = {
            "auroc": a,
            "auroc_std": a_sd,
            "ap": p,
            "ap_std": p_sd,
            "per_seed_auroc": per_seed_auroc,
            "per_seed_ap": per_seed_ap,
            "per_seed_generators_auroc": per_seed_gen,
            "generators_auroc": mean_std(per_seed_gen)[0],
            "generators_auroc_std": mean_std(per_seed_gen)[1],
            "sources": {
                src: {
                    "auroc": mean_std([m["auroc"] for m in ms])[0],
                    "auroc_std": mean_std([m["auroc"] for m in ms])[1],
                    "ap": mean_std([m["ap"] for m in ms])[0],
                    "per_format": {f: mean_std([m["per_format"][f] for m in ms])[0] for f in ms[0]["per_format"]},
                }
                for src, ms in sources.items()
            },
            "samples": samples,
            "samples_per_s": samples / max(sum(r.seconds for r in runs[gen]), 1e-9),
        }
    paired = AGENT in rows and OPEN_LOOP in rows
    gain = (
        clustered_difference(rows[AGENT]["per_seed_auroc"], rows[OPEN_LOOP]["per_seed_auroc"], draws) if paired else None
    )
    gain_generators = (
        clustered_difference(rows[AGENT]["per_seed_generators_auroc"], rows[OPEN_LOOP]["per_seed_generators_auroc"], draws)
        if paired
        else None
    )
    others = {g: r for g, r in rows.items() if g not in ENGINE_ROWS}
    best = max(others, key=lambda g: others[g]["auroc"]) if others else None
    return {"rows": rows, "agent_minus_open_loop": gain, "agent_minus_open_loop_generators": gain_generators,
            "best_other": best, "detector_draws": draws}


def run_transfer(cfg: TransferConfig) -> dict[str, Any]:
    """The whole benchmark; writes report.md, report.json, bars.png and contact sheets under `cfg.out`.

    Returns:
        The report (also in report.json).
    """
    import torch

    from evals.errors import EvalError
    from evals.generator_eval import _Images
    from evals.transfer_config import ROWS
    from evals.transfer_data import build, split_record
    from evals.transfer_report import write_report

    unknown = sorted(set(cfg.generators) - set(ROWS))
    if unknown:
        raise EvalError(f"unknown generators {unknown}; choose from {list(ROWS)}")
    if cfg.detector_seeds < 1 or cfg.data_draws < 1:
        raise EvalError("--detector-seeds and --data-draws must be at least 1")
    torch.set_num_threads(1)  # one thread is fastest on a shared 2-core machine
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), os.getloadavg()
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, dict[str, Any]]]] = {g: [] for g in cfg.generators}
    runs: dict[str, list] = {}
    draws: list[int] = []
    splits: list[dict[str, Any]] = []
    seconds = {"generation": 0.0, "detectors": 0.0}
    first_runs: dict[str, list] = {}
    for index in range(cfg.data_draws):
        draw = cfg.draw(index)
        if cfg.progress:
            logger.info("data draw %d of %d (seed %d)", index + 1, cfg.data_draws, draw.seed)
        began = time.perf_counter()
        data = build(draw)
        images = _Images(cfg.split.size)  # one draw's images at a time in memory
        generated_at = time.perf_counter()
        for gen, per_seed in evaluate(draw, data, images).items():
            results[gen] += per_seed
        draws += [draw.seed] * cfg.detector_seeds
        seconds["generation"] += generated_at - began
        seconds["detectors"] += time.perf_counter() - generated_at
        for gen, generated in data.runs.items():
            runs.setdefault(gen, []).extend(generated)
        first_runs = first_runs or data.runs
        splits.append({"seed": draw.seed, **split_record(data)})
    report = {
        "protocol": __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("split", "detector")},
            "split": asdict(cfg.split),
            "detector": asdict(cfg.detector),
        },
        **summarize(cfg, runs, results, draws),
        "per_seed": results,
        "splits": splits[0],
        "draw_splits": splits,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "load_average": {"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in os.getloadavg()]},
        "wall_seconds": round(time.perf_counter() - started, 1),
        # One torch thread and one batch worker: CPU seconds are close to the wall time on an idle machine.
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    write_report(report, cfg.out, first_runs)
    return report


def _pm(row: dict[str, Any] | None) -> str:
    return "n/a" if row is None else f"{row['auroc']:.3f}±{row['auroc_std']:.3f}"


def last_line(report: dict[str, Any]) -> str:
    """`transfer agent AUROC a±s open_loop b±s best_other c±s (name)`."""
    rows, best = report["rows"], report["best_other"]
    return (
        f"transfer agent AUROC {_pm(rows.get(AGENT))} open_loop {_pm(rows.get(OPEN_LOOP))} "
        f"best_other {_pm(rows.get(best))} ({best or 'none'})"
    )

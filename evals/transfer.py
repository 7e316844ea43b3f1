"""`anomaly-agent eval transfer`: does a detector trained on generator G's anomalies find anomalies G never made?

For every row G and detector seed: a small fully convolutional detector (`evals.transfer_detector`) trains
on the training normals plus G's training anomalies, then is tested on each held-out source
(`evals.transfer_data.held_out_sources`): every other generator's anomalies on held-out normals (the
agent and the open loop share an engine, so neither is tested on the other's) and the engine's family-F
defects for every family F; the two engine rows are tested on those by one more detector per family,
trained without F. Every test anomaly covers at least QE's resolution floor.
Per source and category: image AUROC and AP of the held-out normals against the source's anomalies, every
image in every stored format (PNG, JPEG); per source: the mean over categories; per row and seed: the
mean over sources; per row: mean and standard deviation over seeds. The agent's gain over the open loop
is paired over seeds (same seeds, same test sets) with its standard error.
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


def summarize(cfg: TransferConfig, data, results: dict[str, list[dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """Rows (mean ± std over seeds of the mean over sources), per-source AUROC, the paired agent gain."""
    rows: dict[str, dict[str, Any]] = {}
    for gen, seeds in results.items():
        per_seed_auroc = [float(np.mean([m["auroc"] for m in s.values()])) for s in seeds]
        per_seed_ap = [float(np.mean([m["ap"] for m in s.values()])) for s in seeds]
        # The same mean over the other generators' sources only (the engine:F sets left out), a set every row has.
        per_seed_gen = [float(np.mean([m["auroc"] for k, m in s.items() if not is_lofo(k)])) for s in seeds]
        runs = data.runs[gen]
        samples = sum(r.samples for r in runs)
        a, a_sd = mean_std(per_seed_auroc)
        p, p_sd = mean_std(per_seed_ap)
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
                    "auroc": mean_std([s[src]["auroc"] for s in seeds])[0],
                    "auroc_std": mean_std([s[src]["auroc"] for s in seeds])[1],
                    "ap": mean_std([s[src]["ap"] for s in seeds])[0],
                    "per_format": {
                        f: mean_std([s[src]["per_format"][f] for s in seeds])[0] for f in seeds[0][src]["per_format"]
                    },
                }
                for src in seeds[0]
            },
            "samples": samples,
            "samples_per_s": samples / max(sum(r.seconds for r in runs), 1e-9),
        }
    paired = AGENT in rows and OPEN_LOOP in rows
    gain = paired_difference(rows[AGENT]["per_seed_auroc"], rows[OPEN_LOOP]["per_seed_auroc"]) if paired else None
    gain_generators = (
        paired_difference(rows[AGENT]["per_seed_generators_auroc"], rows[OPEN_LOOP]["per_seed_generators_auroc"])
        if paired
        else None
    )
    others = {g: r for g, r in rows.items() if g not in ENGINE_ROWS}
    best = max(others, key=lambda g: others[g]["auroc"]) if others else None
    return {"rows": rows, "agent_minus_open_loop": gain, "agent_minus_open_loop_generators": gain_generators,
            "best_other": best}


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
    if cfg.detector_seeds < 1:
        raise EvalError("--detector-seeds must be at least 1")
    torch.set_num_threads(1)  # one thread is fastest on a shared 2-core machine
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), os.getloadavg()
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = build(cfg)
    generated_at = time.perf_counter()
    results = evaluate(cfg, data, _Images(cfg.split.size))
    report = {
        "protocol": __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("split", "detector")},
            "split": asdict(cfg.split),
            "detector": asdict(cfg.detector),
        },
        **summarize(cfg, data, results),
        "per_seed": results,
        "splits": split_record(data),
        "seconds": {
            "generation": round(generated_at - started, 1),
            "detectors": round(time.perf_counter() - generated_at, 1),
        },
        "load_average": {"start": [round(x, 2) for x in load_before], "end": [round(x, 2) for x in os.getloadavg()]},
        "wall_seconds": round(time.perf_counter() - started, 1),
        # One torch thread and one batch worker: CPU seconds are close to the wall time on an idle machine.
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
    }
    write_report(report, cfg.out, data.runs)
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

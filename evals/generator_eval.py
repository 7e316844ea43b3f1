"""`anomaly-agent eval generators`: the agent against three baselines, judged by what they do for a detector.

Two modes, one command:
* real (`real=PATH`, an MVTec-layout dataset): every generator draws on the dataset's train/good images;
  each detector is tested on the real test set (all test/good plus the last 2/3 of each real defect
  type); IC-LPIPS centres are the first floor(n/3) real anomalies of each type.
* cross-generator (no real dataset ships in any registry): normal images come from `tools.samples`,
  split into train and test variants; every generator draws on both; a detector trained on generator
  A's train output is tested on generator B's test output, for every B != A ("real" = B's held-out
  output). A generator's row is the *unweighted mean over its test sources B* of the per-pair numbers,
  and each per-pair number is the unweighted mean over categories. Labelled as cross-generator
  everywhere it is written.

IS and IC-LPIPS are the EfficientNet-Lite0 stand-ins (see `evals.perceptual`), labelled as such.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evals.errors import EvalError
from evals.gen_data import AGENT, DEFAULT_TYPES, GENERATORS, Generated, generate, write_sample_normals
from evals.mvtec_io import GOOD, Category, Item, read_dataset, write_normal
from evals.protocols import (
    TrainConfig,
    anomaly_maps,
    classify,
    last_two_thirds,
    load_resized,
    localization_metrics,
    train_classifier,
    train_localizer,
)

logger = logging.getLogger(__name__)

REAL = "real"
#: Test sources whose anomalies follow their type label (the baselines DRAEM and CutPaste ignore it).
TYPE_AWARE = frozenset({REAL, AGENT, "open_loop"})
#: Metrics of a (train generator, test source) pair, averaged over categories.
LOC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max")


@dataclass
class EvalConfig:
    """What to compare, on what data, at what size."""

    out: Path
    generators: list[str] = field(default_factory=lambda: list(GENERATORS))
    categories: list[str] = field(default_factory=lambda: ["tile", "metal_nut"])
    types: list[str] | None = None
    size: int = 128
    train_normals: int = 12
    test_normals: int = 9
    real: Path | None = None
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    inception_weights: str | None = None
    lpips_weights: str | None = None
    progress: bool = False
    #: The open-loop row as the agent's own first image (same samples and seeds), not the baseline class.
    paired_open_loop: bool = False

    @property
    def mode(self) -> str:
        return "real" if self.real else "cross-generator"


class _Images:
    """Images and masks loaded once, resized to the evaluation side."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: dict[tuple[str, bool], np.ndarray] = {}

    def image(self, item: Item) -> np.ndarray:
        return self._get(item.image, False)

    def mask(self, item: Item) -> np.ndarray:
        return self._get(item.mask, True) if item.mask else np.zeros((self.size, self.size), bool)

    def _get(self, path: Path, mask: bool) -> np.ndarray:
        key = (str(path), mask)
        if key not in self._cache:
            self._cache[key] = load_resized(path, self.size, mask)
        return self._cache[key]


def _types_for(cfg: EvalConfig, category: str, available: list[str] | None = None) -> list[str]:
    types = cfg.types or available or DEFAULT_TYPES.get(category)
    if not types:
        raise EvalError(f"no default defect types for {category!r}; pass --types")
    if available is not None and (missing := sorted(set(types) - set(available))):
        raise EvalError(f"{category} has no real anomalies of type(s) {missing}; it has {available}")
    return list(types)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled)


def prepare_normals(cfg: EvalConfig) -> tuple[dict[str, Category], dict[str, list[str]]]:
    """The normal images (train and test) per category, and the defect types per category."""
    if cfg.real:
        data = read_dataset(cfg.real, cfg.categories or None)
        types = {name: _types_for(cfg, name, cat.defect_types) for name, cat in data.items()}
        for name, cat in data.items():
            if not cat.train or GOOD not in cat.test:
                raise EvalError(f"{cfg.real}/{name} needs train/good and test/good images")
            # Generators draw on copies at the evaluation side: real images are 700-1500 px, and the
            # detectors see everything at `size` anyway.
            cat.train = [
                write_normal(
                    cfg.out / "data" / "normals", name, "train", i, load_resized(item.image, cfg.size)
                )
                for i, item in enumerate(cat.train[: cfg.train_normals])
            ]
        return data, types
    if len(cfg.generators) < 2:
        raise EvalError("the cross-generator protocol needs two or more generators (or --real PATH)")
    root = cfg.out / "data" / "normals"
    write_sample_normals(root, cfg.categories, cfg.train_normals, cfg.test_normals, cfg.size, cfg.seed)
    return read_dataset(root, cfg.categories), {c: _types_for(cfg, c) for c in cfg.categories}


def generate_all(
    cfg: EvalConfig, normals: dict[str, Category], types: dict[str, list[str]]
) -> dict[str, dict[str, Any]]:
    """Every generator's output: {generator: {"train": {category: Category}, "test": ..., "runs": [Generated]}}."""
    splits = ["train"] if cfg.real else ["train", "test"]
    out: dict[str, dict[str, Any]] = {}
    bar = _progress(len(cfg.generators) * len(normals) * len(splits), cfg.progress, "generate")
    for gen in cfg.generators:
        runs: list[Generated] = []
        for split in splits:
            root = cfg.out / "data" / gen / split
            for name, cat in normals.items():
                base = cat.train if split == "train" else cat.test[GOOD]
                runs.append(
                    generate(gen, base, name, types[name], root, cfg.seed + (0 if split == "train" else 7919),
                             paired_open_loop=cfg.paired_open_loop)
                )
                bar.update()
        out[gen] = {split: read_dataset(cfg.out / "data" / gen / split, list(normals)) for split in splits}
        out[gen]["runs"] = runs
    bar.close()
    return out


def _anomalies(cat: Category, types: list[str]) -> dict[str, list[Item]]:
    return {t: cat.test.get(t, []) for t in types}


def perceptual_scores(
    cfg: EvalConfig,
    generated: dict,
    sources: dict[str, dict[str, Category]],
    types: dict[str, list[str]],
    images: _Images,
) -> dict[str, dict[str, Any]]:
    """IS per (category, type) folder of each generator's training output, and IC-LPIPS per test source."""
    from evals.perceptual import class_probabilities, ic_lpips, inception_score, lpips_features

    feats: dict[tuple[str, str, str, str], Any] = {}

    def features(source: str, split: str, cat: str, t: str, items: list[Item]):
        key = (source, split, cat, t)
        if key not in feats:
            feats[key] = lpips_features([images.image(i) for i in items])
        return feats[key]

    result: dict[str, dict[str, Any]] = {}
    for gen in cfg.generators:
        folders, ic = {}, {}
        for cat, cat_types in types.items():
            for t, items in _anomalies(generated[gen]["train"][cat], cat_types).items():
                if len(items) >= 2:
                    folders[f"{cat}/{t}"] = inception_score(
                        class_probabilities([images.image(i) for i in items])
                    )
                for source, by_cat in sources.items():
                    if source == gen:
                        continue
                    real = by_cat[cat].test.get(t, [])
                    centres = real[: max(1, len(real) // 3)]
                    r = ic_lpips(
                        features(source, "centres", cat, t, centres), features(gen, "train", cat, t, items)
                    )
                    ic.setdefault(source, {})[f"{cat}/{t}"] = asdict(r)
        result[gen] = {"is_per_folder": folders, "ic_lpips": ic}
    return result


def downstream(
    cfg: EvalConfig,
    generated: dict,
    normals: dict[str, Category],
    sources: dict[str, dict[str, Category]],
    types: dict[str, list[str]],
    images: _Images,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Per (train generator, test source, category): classification accuracy and localisation metrics."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    bar = _progress(len(cfg.generators) * len(normals), cfg.progress, "train detectors")
    for gen in cfg.generators:
        for name, cat in normals.items():
            cat_types = types[name]
            train_items = [
                (i, k) for k, t in enumerate(cat_types) for i in generated[gen]["train"][name].test.get(t, [])
            ]
            if not train_items:
                raise EvalError(f"{gen} produced no anomalies for {name}")
            x = [images.image(i) for i, _ in train_items]
            classifier = train_classifier(x, [k for _, k in train_items], len(cat_types), cfg.train)
            normal_x = [images.image(i) for i in cat.train]
            localizer = train_localizer(
                x + normal_x,
                [images.mask(i) for i, _ in train_items] + [images.mask(i) for i in cat.train],
                cfg.train,
            )
            for source, by_cat in sources.items():
                if source == gen:
                    continue
                test = [
                    (i, k)
                    for k, t in enumerate(cat_types)
                    for i in last_two_thirds(by_cat[name].test.get(t, []))
                ]
                preds = classify(classifier.model, [images.image(i) for i, _ in test])
                good = cat.test[GOOD]
                loc_items = good + [i for i, _ in test]
                maps = anomaly_maps(localizer.model, [images.image(i) for i in loc_items])
                row = {
                    "cls_acc": float(np.mean(preds == np.array([k for _, k in test])))
                    if test
                    else float("nan"),
                    "cls_test": len(test),
                    "loc_test_normal": len(good),
                    "loc_test_anomalous": len(test),
                    "cls_best_epoch": classifier.best_epoch,
                    "loc_best_epoch": localizer.best_epoch,
                    **localization_metrics(maps, np.stack([images.mask(i) for i in loc_items])),
                }
                out.setdefault(gen, {}).setdefault(source, {})[name] = row
            bar.update()
    bar.close()
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def aggregate(cfg: EvalConfig, generated: dict, perceptual: dict, results: dict) -> dict[str, Any]:
    """Per-pair means over categories, then per-generator means over test sources."""
    pairs: dict[str, dict[str, dict[str, float]]] = {}
    rows: dict[str, dict[str, float]] = {}
    for gen in cfg.generators:
        for source, by_cat in results[gen].items():
            pair = {k: _mean([m[k] for m in by_cat.values()]) for k in ("cls_acc", *LOC_KEYS)}
            ic = perceptual[gen]["ic_lpips"].get(source, {})
            pair["ic_lpips"] = _mean([v["score"] for v in ic.values()])
            pair["ic_lpips_empty_clusters"] = int(sum(v["empty"] for v in ic.values()))
            pair["ic_lpips_clusters"] = int(sum(v["clusters"] for v in ic.values()))
            pairs.setdefault(gen, {})[source] = pair
        runs: list[Generated] = generated[gen]["runs"]
        row = {k: _mean([p[k] for p in pairs[gen].values()]) for k in ("cls_acc", *LOC_KEYS, "ic_lpips")}
        row["ic_lpips_empty_clusters"] = sum(p["ic_lpips_empty_clusters"] for p in pairs[gen].values())
        row["ic_lpips_clusters"] = sum(p["ic_lpips_clusters"] for p in pairs[gen].values())
        row["cls_acc_type_aware"] = _mean([p["cls_acc"] for s, p in pairs[gen].items() if s in TYPE_AWARE])
        row["is"] = _mean(list(perceptual[gen]["is_per_folder"].values()))
        row["samples"] = sum(r.samples for r in runs)
        row["samples_per_s"] = row["samples"] / max(sum(r.seconds for r in runs), 1e-9)
        row["loc_ap"] = row["pixel_ap"]
        rows[gen] = row
    return {"rows": rows, "pairs": pairs}


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """The whole evaluation; writes report.md, report.json, plots and contact sheets under `cfg.out`.

    Returns:
        The report (also in report.json).
    """
    import time

    import torch

    from evals.eval_report import write_report
    from evals.perceptual import STANDIN_IS, STANDIN_LPIPS, check_reference_weights

    check_reference_weights(cfg.inception_weights, cfg.lpips_weights)
    unknown = sorted(set(cfg.generators) - set(GENERATORS))
    if unknown:
        raise EvalError(f"unknown generators {unknown}; choose from {list(GENERATORS)}")
    torch.set_num_threads(1)  # one thread is fastest on a shared 2-core machine (RESULTS.md)
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    normals, types = prepare_normals(cfg)
    generated = generate_all(cfg, normals, types)
    sources = {REAL: normals} if cfg.real else {g: generated[g]["test"] for g in cfg.generators}
    images = _Images(cfg.size)
    perceptual = perceptual_scores(cfg, generated, sources, types, images)
    results = downstream(cfg, generated, normals, sources, types, images)
    summary = aggregate(cfg, generated, perceptual, results)
    report = {
        "mode": cfg.mode,
        "protocol": (
            "real: detectors trained on each generator's output, tested on the real test set"
            if cfg.real
            else "cross-generator: trained on generator A's output (train normals), tested on generator B's held-out "
            "output (test normals) for every B != A; a row is the unweighted mean over B of per-pair numbers, each "
            "the unweighted mean over categories. Not real defects."
        ),
        "labels": {
            "is": STANDIN_IS,
            "ic_lpips": STANDIN_LPIPS,
            "loc_ap": "pixel AP (UNet)",
            "cls_acc": "ResNet34 defect-type accuracy",
        },
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "train"},
            "train": asdict(cfg.train),
        },
        "types": types,
        "rows": summary["rows"],
        "pairs": summary["pairs"],
        "per_category": results,
        "perceptual": perceptual,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_report(report, cfg.out, {g: generated[g]["runs"] for g in cfg.generators})
    return report


def last_line(report: dict[str, Any], generator: str = AGENT) -> str:
    """`eval <generator> loc_ap <x> cls_acc <y>`: the agent's row (or the first generator's)."""
    rows = report["rows"]
    name = generator if generator in rows else next(iter(rows))
    return f"eval {name} loc_ap {rows[name]['loc_ap']:.4f} cls_acc {rows[name]['cls_acc']:.4f}"

"""The sample sets of the transfer benchmark: training data per generator, held-out test sources, camera copies.

Why these splits:
* Training normals and held-out normals are different images (`tools.samples` variants); every test
  anomaly is drawn on a held-out normal, so no test image, normal or anomalous, was seen in training.
  Generators draw on the first few normals of each split (`SplitConfig.bases`); the detectors train on
  every training normal and are tested on every held-out one.
* Each generator draws its training anomalies on the training normals and its test anomalies on the
  held-out normals (`evals.generator_eval.generate_all`, the agent through the real batch path).
* Leave-one-family-out: the engine draws every type once more on the held-out normals with a seed
  stream of its own (PG template + IG, once: what the engine makes, not what a row trained on); test
  source `engine:F` is its family-F part. Every row is tested on exactly these sets (the engine rows by a
  detector trained without family F).
* A test anomaly covers at least QE's resolution floor (`resolvable`): a speck of a few pixels is no
  defect at this resolution, for any generator.
* A camera stores images as PNG or JPEG: every test image is kept as PNG and as JPEG at usual
  qualities, and all copies are scored, so compression separates nothing.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evals.errors import EvalError
from evals.gen_data import Generated, generate
from evals.mvtec_io import GOOD, Category, Item, read_dataset
from evals.transfer_config import TransferConfig
from tools.imaging import _atomic_write, load_image

logger = logging.getLogger(__name__)

#: The engine's own test set for the leave-one-family-out split, and the prefix of its sources.
ENGINE = "engine"
ENGINE_SEED_OFFSET = 104_729
PNG = "png"


def lofo_source(family: str) -> str:
    """The name of the test source holding the engine's family-`family` defects."""
    return f"{ENGINE}:{family}"


@dataclass
class TransferData:
    """Everything the detectors train and test on.

    Attributes:
        train_normals / test_normals: {category: [Item]} (disjoint image sets).
        train: {generator: {category: {type: [Item]}}}, anomalies on the training normals.
        test: {source: {category: [Item]}}, the selected anomalies of each test source (PNG originals).
        camera: {source or "good": {category: {format: [Item]}}}, the stored copies that are scored.
        families: {category: {type: family}}.
        runs: {generator: [Generated]}, for samples/s and contact sheets.
    """

    train_normals: dict[str, list[Item]]
    test_normals: dict[str, list[Item]]
    train: dict[str, dict[str, dict[str, list[Item]]]]
    test: dict[str, dict[str, list[Item]]]
    camera: dict[str, dict[str, dict[str, list[Item]]]] = field(default_factory=dict)
    families: dict[str, dict[str, str]] = field(default_factory=dict)
    runs: dict[str, list[Generated]] = field(default_factory=dict)

    def family_names(self) -> list[str]:
        """The engine families that occur in the chosen types, sorted."""
        return sorted({f for by_type in self.families.values() for f in by_type.values()})


def category_types(cfg: TransferConfig) -> dict[str, list[str]]:
    """The defect types per category: the configured ones, or every type the catalog lists for it."""
    from tools.knowledge.catalog import load_catalog

    catalog = load_catalog()
    out = {}
    for name in cfg.split.categories:
        given = (cfg.split.types or {}).get(name)
        out[name] = [catalog.defect(name, t).name for t in given] if given else sorted(
            catalog.category(name).defects
        )
    return out


def type_families(types: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """{category: {type: engine family}} from the catalog."""
    from tools.knowledge.catalog import load_catalog

    catalog = load_catalog()
    return {c: {t: catalog.defect(c, t).family for t in ts} for c, ts in types.items()}


def spread_over_types(by_type: dict[str, list[Item]], limit: int) -> list[Item]:
    """At most `limit` items, taken round-robin over the types (sorted), each type in its own order."""
    queues = [list(by_type[t]) for t in sorted(by_type) if by_type[t]]
    out: list[Item] = []
    while queues and len(out) < limit:
        for q in list(queues):
            if len(out) >= limit:
                break
            out.append(q.pop(0))
            if not q:
                queues.remove(q)
    return out


def encode_as(image: np.ndarray, fmt: str) -> bytes:
    """`image` encoded as PNG (`fmt` "png") or JPEG (`fmt` "jpegQ", Q the quality, 4:2:0 as cameras do)."""
    buf = io.BytesIO()
    if fmt == PNG:
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=int(fmt.removeprefix("jpeg")))
    return buf.getvalue()


def camera_formats(qualities: tuple[int, ...]) -> list[str]:
    """The stored formats of every test image: PNG and one JPEG per quality."""
    return [PNG, *(f"jpeg{q}" for q in qualities)]


def _store_copies(items: list[Item], folder: Path, formats: list[str]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {fmt: [] for fmt in formats}
    for item in items:
        image = load_image(item.image)
        stem = f"{item.image.parent.name}_{item.image.stem}"
        for fmt in formats:
            path = folder / fmt / f"{stem}.{'png' if fmt == PNG else 'jpg'}"
            data = encode_as(image, fmt)
            _atomic_write(path, lambda f, data=data: f.write(data))
            out[fmt].append(Item(path, item.mask))
    return out


def _by_type(
    cat: Category, types: list[str], keep: Callable[[list[Item]], list[Item]] = list
) -> dict[str, list[Item]]:
    return {t: keep(list(cat.test.get(t, []))) for t in types}


def build(cfg: TransferConfig) -> TransferData:
    """Write the normals, every generator's train and test output, the engine's family sets and the camera copies.

    Raises:
        EvalError: a generator wrote no training anomalies for a category.
    """
    from evals.gen_data import write_sample_normals
    from evals.generator_eval import EvalConfig, generate_all

    split = cfg.split
    types = category_types(cfg)
    families = type_families(types)
    data_root = cfg.out / "data"
    train_bases, test_bases = split.bases()
    write_sample_normals(
        data_root / "normals", list(split.categories), train_bases, test_bases, split.size, cfg.seed,
        extra_train=split.train_normals - train_bases, extra_test=split.test_normals - test_bases,
    )
    normals = read_dataset(data_root / "normals", list(split.categories))
    bases = {
        c: Category(c, cat.train[:train_bases], {GOOD: cat.test[GOOD][:test_bases]}) for c, cat in normals.items()
    }
    eval_cfg = EvalConfig(
        out=cfg.out, generators=list(cfg.generators), seed=cfg.seed, progress=cfg.progress, paired_open_loop=True
    )
    generated = generate_all(eval_cfg, bases, types)
    engine_root = data_root / ENGINE / "test"
    engine_runs = [
        generate("open_loop", cat.test[GOOD], name, types[name], engine_root, cfg.seed + ENGINE_SEED_OFFSET)
        for name, cat in bases.items()
    ]
    engine = read_dataset(engine_root, list(normals))

    train: dict[str, dict[str, dict[str, list[Item]]]] = {}
    test: dict[str, dict[str, list[Item]]] = defaultdict(dict)
    for gen in cfg.generators:
        train[gen] = {c: _by_type(generated[gen]["train"][c], types[c]) for c in normals}
        for c in normals:
            if not any(train[gen][c].values()):
                raise EvalError(f"{gen} wrote no training anomalies for {c}; see the log")
            if chosen := spread_over_types(_by_type(generated[gen]["test"][c], types[c], resolvable), split.test_anomalies):
                test[gen][c] = chosen
    for family in sorted({f for by_type in families.values() for f in by_type.values()}):
        for c in normals:
            members = [t for t in types[c] if families[c][t] == family]
            if members and (chosen := spread_over_types(_by_type(engine[c], members, resolvable), split.test_anomalies)):
                test[lofo_source(family)][c] = chosen

    formats = camera_formats(split.jpeg_qualities)
    camera_root = data_root / "camera"
    camera: dict[str, dict[str, dict[str, list[Item]]]] = {
        GOOD: {c: _store_copies(cat.test[GOOD], camera_root / GOOD / c, formats) for c, cat in normals.items()}
    }
    for source, by_cat in test.items():
        folder = camera_root / source.replace(":", "_")
        camera[source] = {c: _store_copies(items, folder / c, formats) for c, items in by_cat.items()}
    return TransferData(
        train_normals={c: cat.train for c, cat in normals.items()},
        test_normals={c: cat.test[GOOD] for c, cat in normals.items()},
        train=train,
        test=dict(test),
        camera=camera,
        families=families,
        runs={**{g: generated[g]["runs"] for g in cfg.generators}, ENGINE: engine_runs},
    )


def held_out_sources(generator: str, data: TransferData, generators: tuple[str, ...]) -> dict[str, str | None]:
    """{test source: family left out of training (None: the full training set)} for one row.

    Every source the row did not make: every other generator's output (the engine rows are not tested on
    each other's) and the engine's family sets `engine:F`. An engine row made family F's kind of defect, so
    it is tested on `engine:F` by a detector trained without family F; any other row by its one detector.
    A source with no test anomaly (every one under the resolution floor) is left out.
    """
    from evals.transfer_config import ENGINE_ROWS

    sources: dict[str, str | None] = {
        g: None for g in generators if g != generator and not {g, generator} <= ENGINE_ROWS
    }
    engine_row = generator in ENGINE_ROWS
    sources.update({lofo_source(f): f if engine_row else None for f in data.family_names()})
    return {s: f for s, f in sources.items() if data.test.get(s)}


def resolvable(items: list[Item]) -> list[Item]:
    """The anomalies whose mask covers at least `MIN_PIXELS` pixels, the least a defect needs to be seen at
    the image's resolution (QE's own floor); smaller ones test no detector and no generator."""
    from tools.imaging import load_mask
    from tools.quality_eval import MIN_PIXELS

    return [i for i in items if i.mask is not None and int(load_mask(i.mask).sum()) >= MIN_PIXELS]


def training_items(
    data: TransferData, generator: str, leave_out: str | None = None
) -> tuple[list[Item], list[Item]]:
    """(normals, anomalies) a detector for `generator` trains on; without family `leave_out` when given.

    Raises:
        EvalError: nothing is left to train on after leaving the family out.
    """
    normals = [i for items in data.train_normals.values() for i in items]
    anomalies = [
        item
        for c, by_type in data.train[generator].items()
        for t, items in by_type.items()
        if leave_out is None or data.families[c][t] != leave_out
        for item in items
    ]
    if not anomalies:
        raise EvalError(f"{generator} has no training anomalies outside family {leave_out!r}; add types")
    return normals, anomalies


def split_record(data: TransferData) -> dict[str, Any]:
    """What trained and what tested, as paths (written to the report so the splits can be checked)."""
    return {
        "train_normals": sorted(str(i.image) for items in data.train_normals.values() for i in items),
        "test_normals": sorted(str(i.image) for items in data.test_normals.values() for i in items),
        "test_sources": {
            s: {c: [str(i.image) for i in items] for c, items in by_cat.items()} for s, by_cat in data.test.items()
        },
        "families": data.families,
    }

"""The transfer benchmark (`anomaly-agent eval transfer`): a tiny seeded run end to end, its splits, its
camera copies, and its metrics on inputs whose answer is known."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals.mvtec_io import Item
from evals.transfer import category_metrics, clustered_difference, last_line, paired_difference, source_metrics
from evals.transfer_config import DetectorConfig
from evals.transfer_data import TransferData, held_out_sources, lofo_source, spread_over_types, training_items

ROWS = ("agent", "open_loop", "draem", "cutpaste_scar", "defect_synthesis")
LINE = re.compile(
    r"transfer agent AUROC \d\.\d{3}±\d\.\d{3} open_loop \d\.\d{3}±\d\.\d{3} "
    r"best_other \d\.\d{3}±\d\.\d{3} \((draem|cutpaste_scar|defect_synthesis)\)"
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """One seeded run of the whole command: one object category, two types of two families, 2 data draws of one
    detector seed each."""
    from anomaly_agent_cli import main

    out = tmp_path_factory.mktemp("transfer") / "out"
    argv = [
        "eval", "transfer", "--out", str(out), "--categories", "metal_nut", "--types", "scratch,color",
        "--size", "64", "--train-normals", "2", "--test-normals", "2", "--test-anomalies", "4",
        "--data-draws", "2", "--detector-seeds", "1", "--steps", "3", "--unet-base", "4", "--no-progress",
    ]  # fmt: skip
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    assert code == 0
    return out, buf.getvalue(), json.loads((out / "report.json").read_text())


def test_tiny_run_writes_the_report_and_ends_with_the_summary_line(tiny_run):
    out, stdout, report = tiny_run
    assert LINE.fullmatch(stdout.strip().splitlines()[-1])
    assert stdout.strip().splitlines()[-1] == last_line(report)
    for name in ("report.md", "report.json", "bars.png", *(f"contact_{g}.png" for g in ROWS)):
        assert (out / name).is_file(), name
    assert list(report["rows"]) == list(ROWS)
    assert all(len(r["per_seed_auroc"]) == 2 for r in report["rows"].values())
    # The 'other generators only' column is the mean over the sources that are not engine:F sets.
    draem = report["per_seed"]["draem"][0]
    assert report["rows"]["draem"]["per_seed_generators_auroc"][0] == pytest.approx(
        np.mean([m["auroc"] for k, m in draem.items() if not k.startswith("engine:")])
    )
    md = (out / "report.md").read_text()
    assert "agent − open_loop" in md and "per held-out source" in md
    gain = report["agent_minus_open_loop"]
    differences = np.subtract(report["rows"]["agent"]["per_seed_auroc"], report["rows"]["open_loop"]["per_seed_auroc"])
    assert report["detector_draws"] == [0, 1] and gain["draws"] == 2 and gain["seeds"] == 2
    # One detector per draw: the standard error over draws is that of the two differences.
    assert gain["per_draw"] == pytest.approx(list(differences))
    assert gain["mean"] == pytest.approx(differences.mean())
    assert gain["se"] == pytest.approx(np.std(differences, ddof=1) / np.sqrt(2))
    assert "over 2 data draws" in md
    # Each draw is a data set of its own: other normals, drawn with its own seed, in its own folder.
    first, second = (out / f"draw_{d}" / "data" / "normals" / "metal_nut" / "train" / "good" for d in (0, 1))
    names = sorted(p.name for p in first.iterdir())
    assert names and names == sorted(p.name for p in second.iterdir())
    assert not np.array_equal(np.asarray(Image.open(first / names[0])), np.asarray(Image.open(second / names[0])))


def test_the_open_loop_is_the_agents_own_first_image_of_every_run(tiny_run):
    """Same samples, seeds and first instruction; the open loop stops after one image, the agent may retry;
    where the agent's first image passed, both rows hold the same pixels."""
    out, _, report = tiny_run
    first: dict[str, tuple[str, list[str]]] = {}
    for gen in ("agent", "open_loop"):
        for line in (out / "draw_0" / "data" / gen / "train" / "trajectories.jsonl").read_text().splitlines():
            record = json.loads(line)
            calls = [c["function"] for m in record["messages"] if m["role"] == "assistant" for c in m.get("tool_calls") or []]
            prompts = [json.loads(c["arguments"])["prompt"] for c in calls if c["name"] == "image_gen"]
            key = f"{record['category']}/{record['anomaly_type']}/{record['id']}"
            if gen == "agent":
                first[key] = (record["seed"], prompts)
            else:
                assert len(prompts) == 1 and first[key] == (record["seed"], first[key][1])
                assert prompts[0] == first[key][1][0], key
    assert len(first) == 4
    same = 0
    for key, (_, prompts) in first.items():
        category, anomaly_type, name = key.split("/")
        images = [np.asarray(Image.open(out / "draw_0" / "data" / g / "train" / category / "test" / anomaly_type / f"{name}.png"))
                  for g in ("agent", "open_loop")]
        same += len(prompts) == 1 and np.array_equal(*images)
    assert same == sum(len(p) == 1 for _, p in first.values())
    gain = report["agent_minus_open_loop_generators"]
    assert gain["mean"] == pytest.approx(np.mean(np.subtract(
        report["rows"]["agent"]["per_seed_generators_auroc"], report["rows"]["open_loop"]["per_seed_generators_auroc"])))


def test_no_held_out_normal_is_trained_on(tiny_run):
    _, _, report = tiny_run
    splits = report["splits"]
    train = {Path(p).resolve() for p in splits["train_normals"]}
    test = {Path(p).resolve() for p in splits["test_normals"]}
    assert train and test and not train & test
    train_pixels = [np.asarray(Image.open(p)) for p in train]
    for p in test:
        pixels = np.asarray(Image.open(p))
        assert not any(np.array_equal(pixels, t) for t in train_pixels), p
    # Every test anomaly was drawn on the held-out normals (the generators' test split), never the training one.
    for source, by_cat in splits["test_sources"].items():
        owner = source.split(":")[0]
        for paths in by_cat.values():
            assert paths and all(f"/data/{owner}/test/" in p for p in paths), source


def test_no_generator_is_tested_on_its_own_output_or_its_engine_twin(tiny_run):
    _, _, report = tiny_run
    for gen, row in report["rows"].items():
        sources = set(row["sources"])
        assert gen not in sources
        # A draw may lose an engine:F set (no defect above the resolution floor); the row lists every source tested.
        assert set().union(*report["per_seed"][gen]) == sources
        tested = {d["seed"]: set(d["test_sources"]) for d in report["draw_splits"]}
        for draw, seed in zip(report["detector_draws"], report["per_seed"][gen], strict=True):
            assert set(seed) <= tested[draw]
    assert "open_loop" not in report["rows"]["agent"]["sources"]
    assert "agent" not in report["rows"]["open_loop"]["sources"]
    # Every engine:F set that kept a resolvable defect tests every row.
    lofo = {s for draw in report["draw_splits"] for s in draw["test_sources"] if s.startswith("engine:")}
    assert lofo and lofo <= {lofo_source("line"), lofo_source("blob")}
    assert all(lofo <= set(row["sources"]) for row in report["rows"].values())


def test_every_test_image_is_also_stored_as_jpeg(tiny_run):
    out, _, report = tiny_run
    camera = out / "draw_0" / "data" / "camera"
    sources = ["good", *(s.replace(":", "_") for s in report["splits"]["test_sources"])]
    for source in sources:
        folder = camera / source / "metal_nut"
        pngs = sorted((folder / "png").glob("*.png"))
        assert pngs, source
        for fmt in ("jpeg75", "jpeg90"):
            jpegs = sorted((folder / fmt).glob("*.jpg"))
            assert [p.stem for p in jpegs] == [p.stem for p in pngs]
            with Image.open(jpegs[0]) as im:
                assert im.format == "JPEG"
                assert not np.array_equal(np.asarray(im.convert("RGB")), np.asarray(Image.open(pngs[0])))


def _data(families: dict[str, str]) -> TransferData:
    """Two training anomalies per type of one category (paths only; nothing is loaded)."""
    train = {
        gen: {"tile": {t: [Item(Path(f"{gen}/{t}/{i}.png"), Path(f"{gen}/{t}/{i}_mask.png")) for i in range(2)]
                       for t in families}}
        for gen in ROWS
    }
    return TransferData(
        train_normals={"tile": [Item(Path("n0.png")), Item(Path("n1.png"))]},
        test_normals={"tile": [Item(Path("t0.png"))]},
        train=train,
        test={s: {"tile": [Item(Path(f"{s}.png"))]} for s in (*ROWS, *(lofo_source(f) for f in families.values()))},
        families={"tile": families},
    )


def test_leave_one_family_out_trains_without_the_family_and_tests_on_it():
    data = _data({"crack": "line", "gray_stroke": "line", "oil": "blob", "rough": "blob"})
    normals, anomalies = training_items(data, "agent", leave_out="line")
    assert len(normals) == 2
    assert anomalies and all(item.image.parts[1] in ("oil", "rough") for item in anomalies)
    assert len(training_items(data, "agent")[1]) == 8
    plan = held_out_sources("agent", data, ROWS)
    assert plan == {"draem": None, "cutpaste_scar": None, "defect_synthesis": None,
                    "engine:blob": "blob", "engine:line": "line"}
    assert held_out_sources("draem", data, ROWS) == {
        **{g: None for g in ROWS if g != "draem"}, "engine:blob": None, "engine:line": None
    }


def test_leaving_out_the_only_family_is_refused():
    from evals.errors import EvalError

    with pytest.raises(EvalError, match="outside family"):
        training_items(_data({"crack": "line"}), "agent", leave_out="line")


def test_a_detector_map_equal_to_the_mask_scores_auroc_one():
    from evals.protocols import image_scores

    rng = np.random.default_rng(0)
    masks = np.zeros((6, 32, 32), bool)
    for m in masks[3:]:
        y, x = rng.integers(0, 24, 2)
        m[y : y + 6, x : x + 6] = True
    scores = image_scores(masks.astype(np.float32), pool=5)
    assert category_metrics(scores[:3], scores[3:]) == {"auroc": 1.0, "ap": 1.0}
    assert category_metrics(scores[3:], scores[:3])["auroc"] == 0.0
    normal = {"a": {"png": scores[:3], "jpeg75": scores[:3]}, "b": {"png": scores[:3], "jpeg75": scores[:3]}}
    anomal = {"a": {"png": scores[3:], "jpeg75": scores[3:]}, "b": {"png": scores[:1] + 0.0, "jpeg75": scores[:1]}}
    m = source_metrics(normal, anomal)
    assert m["per_category"] == {"a": 1.0, "b": 0.5}  # b: its anomalies score like its normals (all ties)
    assert m["auroc"] == pytest.approx(0.75) and m["per_format"] == {"jpeg75": 0.75, "png": 0.75}


def test_paired_difference_is_mean_and_standard_error_of_per_seed_differences():
    d = paired_difference([0.7, 0.8, 0.9], [0.6, 0.6, 0.7])
    assert d["mean"] == pytest.approx(1 / 6)
    assert d["se"] == pytest.approx(np.std([0.1, 0.2, 0.2], ddof=1) / np.sqrt(3))
    assert d["z"] == pytest.approx(d["mean"] / d["se"]) and d["seeds"] == 3


def test_the_gain_has_its_standard_error_over_data_draws_and_over_seeds_only_with_one_draw():
    # Two draws, two detector seeds each: the seeds agree within a draw, the draws do not.
    a, b = [0.80, 0.81, 0.70, 0.71], [0.70, 0.71, 0.70, 0.71]
    gain = clustered_difference(a, b, [0, 0, 1, 1])
    assert gain["per_draw"] == pytest.approx([0.10, 0.0])
    assert gain["mean"] == pytest.approx(0.05) and gain["se"] == pytest.approx(0.05)
    # Over detector seeds alone the spread of the draws is invisible: a far smaller error.
    assert gain["se_detectors"] == pytest.approx(paired_difference(a, b)["se"]) and gain["se_detectors"] < gain["se"] / 1.5
    one = clustered_difference(a[:2], b[:2], [0, 0])
    assert one["draws"] == 1 and one["se"] == one["se_detectors"]


def test_spread_over_types_takes_types_in_turn():
    items = {t: [Item(Path(f"{t}{i}")) for i in range(3)] for t in ("b", "a")}
    assert [str(i.image) for i in spread_over_types(items, 4)] == ["a0", "b0", "a1", "b1"]
    assert len(spread_over_types(items, 100)) == 6


def test_third_party_generator_is_seeded_and_leaves_global_random_state_alone():
    from evals.baselines import make_baseline
    from tools.samples import sample_image

    image = sample_image("tile", 0, 96)
    gen = make_baseline("defect_synthesis")
    state = (random.getstate(), np.random.get_state()[1].copy())
    a = gen(image, "tile", "crack", np.random.default_rng(5))
    b = gen(image, "tile", "crack", np.random.default_rng(5))
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.mask.any() and not np.array_equal(a.image[a.mask], image[a.mask])


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", ""])
def test_detector_training_is_reproducible_per_seed_and_scores_every_image(backbone: str):
    from evals.transfer_detector import score, train_detector
    from tools.samples import sample_image

    normals = [sample_image("tile", i, 32) for i in range(2)]
    anomalies = [n.copy() for n in normals]
    masks = [np.zeros((32, 32), bool) for _ in normals]
    for a, m in zip(anomalies, masks, strict=True):
        a[8:16, 8:16] = 255
        m[8:16, 8:16] = True
    cfg = DetectorConfig(backbone=backbone, unet_base=2, unet_depth=2, steps=2, batch=4, crop=32)
    s1 = score(train_detector(normals, anomalies, masks, cfg, seed=1), normals + anomalies, cfg.pool)
    s2 = score(train_detector(normals, anomalies, masks, cfg, seed=1), normals + anomalies, cfg.pool)
    assert s1.shape == (4,) and np.array_equal(s1, s2)


def test_an_anomaly_crop_always_holds_part_of_its_defect_and_a_uniform_one_may_not():
    from evals.transfer_detector import augment

    image = np.zeros((128, 128, 3), np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[2:5, 120:124] = True  # a speck in a corner
    rng = np.random.default_rng(0)
    on = DetectorConfig(crop=32, jpeg_prob=0.0)
    off = DetectorConfig(crop=32, jpeg_prob=0.0, crop_on_defect=False)
    assert all(augment(image, mask, on, rng)[1].any() for _ in range(200))
    assert sum(augment(image, mask, off, rng)[1].any() for _ in range(200)) < 100
    # A normal (empty mask) still gets a uniform crop of the configured size.
    assert augment(image, np.zeros_like(mask), on, rng)[0].shape == (32, 32, 3)


def test_more_normals_never_change_the_first_ones(tmp_path: Path):
    from evals.gen_data import write_sample_normals

    write_sample_normals(tmp_path / "a", ["tile"], 2, 2, 32, 0)
    write_sample_normals(tmp_path / "b", ["tile"], 2, 2, 32, 0, extra_train=2, extra_test=1)
    for split, n in (("train", 4), ("test", 3)):
        first = sorted((tmp_path / "a" / "tile" / split / "good").glob("*.png"))
        more = sorted((tmp_path / "b" / "tile" / split / "good").glob("*.png"))
        assert len(first) == 2 and len(more) == n
        assert [p.read_bytes() for p in first] == [p.read_bytes() for p in more[:2]]
    train = {p.read_bytes() for p in (tmp_path / "b" / "tile" / "train" / "good").glob("*.png")}
    assert not train & {p.read_bytes() for p in (tmp_path / "b" / "tile" / "test" / "good").glob("*.png")}


def test_a_detector_on_frozen_features_finds_held_out_defects_like_the_ones_it_trained_on():
    from evals.transfer_detector import score, train_detector
    from tools.samples import sample_image

    def blotted(images: list[np.ndarray], rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
        out, masks = [], []
        for im in images:
            y, x = rng.integers(8, 48, 2)
            a, m = im.copy(), np.zeros(im.shape[:2], bool)
            m[y : y + 10, x : x + 10] = True
            a[m] = 20
            out.append(a)
            masks.append(m)
        return out, masks

    rng = np.random.default_rng(0)
    normals = [sample_image("tile", i, 64) for i in range(6)]
    held_out = [sample_image("tile", i, 64) for i in range(6, 12)]
    anomalies, masks = blotted(normals, rng)
    tests, _ = blotted(held_out, rng)
    cfg = DetectorConfig(steps=60, batch=8, crop=32, jpeg_prob=0.0)  # untrained, the head scores about 0.5
    model = train_detector(normals, anomalies, masks, cfg, seed=0)
    scores = score(model, held_out + tests, cfg.pool)
    assert category_metrics(scores[:6], scores[6:])["auroc"] >= 0.9


def test_an_unknown_detector_backbone_is_refused():
    from evals.transfer_detector import build_detector

    with pytest.raises(ValueError, match="unknown detector backbone 'resnet'"):
        build_detector(DetectorConfig(backbone="resnet"))


def test_a_test_source_keeps_only_defects_the_image_resolves(tmp_path: Path):
    from evals.transfer_data import resolvable
    from tools.quality_eval import MIN_PIXELS

    items = []
    for n in (MIN_PIXELS - 1, MIN_PIXELS, 200):
        mask = np.zeros((32, 32), np.uint8)
        mask.flat[:n] = 255
        Image.fromarray(mask).save(tmp_path / f"{n}.png")
        items.append(Item(tmp_path / f"{n}_image.png", tmp_path / f"{n}.png"))
    assert [i.mask.name for i in resolvable(items)] == [f"{MIN_PIXELS}.png", "200.png"]

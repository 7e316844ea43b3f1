"""End-to-end tests of the evaluation suite on tiny MVTec-layout datasets built here."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from evals.baselines import BASELINES, make_baseline
from evals.errors import DatasetLayoutError
from evals.mvtec_io import read_dataset, write_anomaly, write_normal
from tools.samples import sample_image

SIZE = 64


def _real_dataset(root, rng):
    """tile: 3 train normals, 2 test normals, 3 'real' anomalies of two types (CutPaste scars here)."""
    scar = make_baseline("cutpaste_scar")
    for i in range(5):
        write_normal(
            root, "tile", "train" if i < 3 else "test", i if i < 3 else i - 3, sample_image("tile", i, SIZE)
        )
    for t in ("crack", "oil"):
        for n in range(3):
            out = scar(sample_image("tile", 10 + n, SIZE), "tile", t, rng)
            write_anomaly(root, "tile", t, n, out.image, out.mask)
    return root


def test_mvtec_reader_pairs_images_with_masks_and_refuses_a_missing_mask(tmp_path):
    root = _real_dataset(tmp_path / "ds", np.random.default_rng(0))
    cat = read_dataset(root)["tile"]
    assert len(cat.train) == 3 and len(cat.test["good"]) == 2 and cat.defect_types == ["crack", "oil"]
    assert all(item.mask.name == f"{item.image.stem}_mask.png" for item in cat.test["oil"])
    (root / "tile" / "ground_truth" / "oil" / "001_mask.png").unlink()
    with pytest.raises(DatasetLayoutError, match="no mask"):
        read_dataset(root)
    with pytest.raises(DatasetLayoutError):
        read_dataset(tmp_path / "missing")


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_return_an_image_and_a_mask_that_covers_the_change(name):
    image = sample_image("metal_nut", 0, SIZE)
    out = make_baseline(name)(image, "metal_nut", "scratch", np.random.default_rng(3))
    assert out.image.shape == image.shape and out.image.dtype == np.uint8
    assert out.mask.shape == image.shape[:2] and out.mask.any()
    # The engine's region is its visible core, and defect-synthesis thresholds its own soft alpha:
    # for both, faint edges may lie outside the mask.
    if name not in ("open_loop", "defect_synthesis"):
        assert np.array_equal(out.image[~out.mask], image[~out.mask])
    assert out.stages and all(v >= 0 for v in out.stages.values())


def test_real_protocol_runs_every_metric_end_to_end(tmp_path):
    from evals.generator_eval import EvalConfig, run_eval
    from evals.protocols import TrainConfig

    root = _real_dataset(tmp_path / "ds", np.random.default_rng(1))
    cfg = EvalConfig(
        out=tmp_path / "out",
        generators=["draem", "open_loop"],
        categories=["tile"],
        size=SIZE,
        train_normals=3,
        real=root,
        train=TrainConfig(cls_epochs=1, loc_epochs=1, unet_base=4, unet_depth=3),
    )
    report = run_eval(cfg)
    assert report["mode"] == "real" and set(report["rows"]) == {"draem", "open_loop"}
    for row in report["rows"].values():
        for key in (
            "loc_ap",
            "image_ap",
            "image_auroc",
            "pixel_auroc",
            "pixel_f1_max",
            "image_f1_max",
            "cls_acc",
        ):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["is"] >= 1.0 and row["ic_lpips"] >= 0.0 and row["samples"] == 6
        assert row["cls_acc_type_aware"] == row["cls_acc"]  # real anomalies follow their labels
    pair = report["per_category"]["draem"]["real"]["tile"]
    assert (pair["cls_test"], pair["loc_test_normal"], pair["loc_test_anomalous"]) == (
        4,
        2,
        4,
    )  # last 2/3 of 3 per type
    assert set(report["perceptual"]["draem"]["is_per_folder"]) == {"tile/crack", "tile/oil"}
    assert (
        "EfficientNet-Lite0" in report["labels"]["is"]
        and "EfficientNet-Lite0" in report["labels"]["ic_lpips"]
    )
    for name in ("report.md", "report.json", "bars.png", "matrix_pixel_ap.png", "contact_draem.png"):
        assert (cfg.out / name).is_file()
    assert "stand-in" in (cfg.out / "report.md").read_text()


def test_cli_cross_generator_eval_ends_with_the_agents_line(tmp_path, capsys):
    from anomaly_agent_cli import main

    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "generators",
            "--out",
            str(out),
            "--generators",
            "agent,cutpaste_scar",
            "--categories",
            "metal_nut",
            "--types",
            "scratch,color",
            "--size",
            str(SIZE),
            "--train-normals",
            "3",
            "--test-normals",
            "3",
            "--cls-epochs",
            "1",
            "--loc-epochs",
            "1",
            "--unet-base",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"eval agent loc_ap \d\.\d{4} cls_acc \d\.\d{4}", lines[-1])
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "cross-generator" and set(report["pairs"]["agent"]) == {"cutpaste_scar"}
    masks = out / "data" / "agent" / "train" / "metal_nut" / "ground_truth" / "color"
    assert len(list(masks.glob("*_mask.png"))) == 3  # named by graph.batch's content rule


def test_cli_refuses_reference_weights_and_bad_datasets_with_one_line(tmp_path, capsys):
    from anomaly_agent_cli import main

    assert main(["eval", "generators", "--out", str(tmp_path), "--lpips-weights", "vgg.pth"]) == 2
    assert main(["eval", "generators", "--out", str(tmp_path), "--real", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "not supported yet" in err and "dataset folder not found" in err


def test_bench_generators_reports_each_generator(capsys):
    from evals.bench_generators import main

    assert (
        main(
            [
                "--samples",
                "1",
                "--size",
                str(SIZE),
                "--generators",
                "draem,cutpaste_scar",
                "--reference",
                "draem",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "cutpaste_scar" in out and "x draem" in out and "peak RSS" in out

"""Unit tests of the evaluation metrics and detectors on hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evals.detectors import UNet, resnet34
from evals.errors import EvalError, WeightsNotSupported
from evals.metrics import auroc, average_precision, f1_max
from evals.perceptual import LpipsFeatures, check_reference_weights, ic_lpips, inception_score, lpips_distance
from evals.protocols import (
    holdout_split,
    image_scores,
    last_two_thirds,
    localization_metrics,
    recalibrate_batch_norm,
)

SCORES = np.array([0.9, 0.8, 0.7, 0.6])
LABELS = np.array([1, 0, 1, 0])


def test_auroc_counts_ordered_pairs_and_ties_as_half():
    assert auroc(SCORES, LABELS) == pytest.approx(0.75)  # 3 of 4 (positive, negative) pairs ordered
    assert auroc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert auroc([0.2, 0.9], [0, 1]) == pytest.approx(1.0)
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))


def test_average_precision_sums_precision_over_recall_steps():
    # thresholds 0.9: P=1, R=1/2; 0.8: P=1/2, R=1/2; 0.7: P=2/3, R=1; 0.6: P=1/2, R=1
    assert average_precision(SCORES, LABELS) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision([0.3, 0.2, 0.1], [1, 1, 0]) == pytest.approx(1.0)


def test_f1_max_is_the_best_threshold():
    assert f1_max(SCORES, LABELS) == pytest.approx(0.8)  # at 0.7: P=2/3, R=1
    assert f1_max([0.3, 0.2, 0.1], [1, 1, 0]) == pytest.approx(1.0)


def test_inception_score_of_uniform_and_one_hot_predictions():
    assert inception_score(np.full((6, 10), 0.1)) == pytest.approx(1.0)
    assert inception_score(np.eye(4)) == pytest.approx(4.0, rel=1e-6)  # confident and spread over 4 classes
    assert inception_score(np.tile(np.eye(4)[0], (5, 1))) == pytest.approx(1.0)  # confident, one class


def _feats(values: list[float]) -> LpipsFeatures:
    return LpipsFeatures([[np.full((1, 1, 1), v, np.float32)] for v in values])


def test_lpips_stand_in_is_zero_for_identical_images_and_positive_otherwise():
    from evals.perceptual import lpips_features

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    fa, fb = lpips_features([a, a, b]).maps[:2], lpips_features([b]).maps[0]
    assert lpips_distance(fa[0], fa[1]) == pytest.approx(0.0, abs=1e-9)
    assert lpips_distance(fa[0], fb) > 0.01


def test_ic_lpips_clusters_on_the_first_third_of_real_anomalies_and_reports_empty_ones():
    real = _feats([0, 10, 50, 60, 70, 80])  # centres: 0 and 10
    result = ic_lpips(real, _feats([0, 1, 2]))  # all nearest to 0; pairwise squared distances 1, 4, 1
    assert result.score == pytest.approx(2.0)
    assert (result.clusters, result.empty, result.sizes) == (2, 1, [3, 0])
    assert np.isnan(ic_lpips(real, _feats([0])).score)


def test_reference_weight_paths_are_refused_clearly():
    check_reference_weights(None, None)
    with pytest.raises(WeightsNotSupported, match="not supported yet"):
        check_reference_weights("inception.pth", None)


def test_resnet34_loads_a_torchvision_format_state_dict(tmp_path):
    source = resnet34(1000)
    names = set(source.state_dict())
    # torchvision's resnet34 names, spot-checked across stages, downsample branches and the head
    assert {
        "conv1.weight",
        "bn1.running_var",
        "layer1.2.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
        "layer3.5.bn2.running_mean",
        "layer4.2.conv2.weight",
        "fc.weight",
        "fc.bias",
    } <= names
    assert sum(k.endswith("conv1.weight") for k in names) == 1 + 3 + 4 + 6 + 3
    torch.save(source.state_dict(), tmp_path / "r34.pth")
    loaded = resnet34(4, tmp_path / "r34.pth")  # ImageNet head does not fit 4 classes: fc stays fresh
    assert torch.equal(loaded.layer3[5].conv2.weight, source.layer3[5].conv2.weight)
    assert loaded.fc.out_features == 4
    torch.save({"backbone.conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(EvalError, match="torchvision-format"):
        resnet34(4, tmp_path / "bad.pth")


def test_detectors_give_logits_of_the_right_shape():
    x = torch.zeros(2, 3, 32, 32)
    assert resnet34(3)(x).shape == (2, 3)
    assert UNet(base=4, depth=3)(x).shape == (2, 1, 32, 32)


def test_image_score_is_the_max_of_the_21x21_average_pooled_map():
    maps = np.zeros((2, 64, 64), np.float32)
    maps[0, 30, 30] = 1.0
    maps[1, 10:31, 10:31] = 0.5
    assert image_scores(maps) == pytest.approx([1 / 441, 0.5])


def test_localization_metrics_on_a_perfect_map():
    masks = np.zeros((3, 32, 32), bool)
    masks[1, 5:9, 5:9] = True
    masks[2, 20:30, 2:4] = True
    m = localization_metrics(masks.astype(np.float32), masks)
    assert all(m[k] == pytest.approx(1.0) for k in m)


def test_holdout_is_stratified_and_test_part_is_the_last_two_thirds():
    train, held = holdout_split([0] * 5 + [1] * 5, 0.2, np.random.default_rng(0))
    assert (
        len(held) == 2 and {i < 5 for i in held} == {True, False} and sorted(train + held) == list(range(10))
    )
    assert last_two_thirds(list(range(7))) == [2, 3, 4, 5, 6]


def test_batch_norm_recalibration_sets_exact_statistics_and_eval_mode():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    x = torch.randn(10, 2, 4, 4) * 3 + 5
    recalibrate_batch_norm(model, x, batch=4)  # batches of 4, 4, 2: the cumulative mean is over batches
    means = torch.stack([x[i : i + 4].mean(dim=(0, 2, 3)) for i in (0, 4, 8)]).mean(0)
    assert torch.allclose(model[0].running_mean, means, atol=1e-5)
    assert not model.training and model[0].momentum == pytest.approx(0.1)

"""Detection metrics over scores and binary labels: AUROC, average precision, F1-max.

Why our own (numpy) and not scikit-learn: scikit-learn is not a dependency of the project, and the three
metrics are a few lines each once the scores are sorted. Ties are handled the way scikit-learn handles
them (all samples with one score enter the curve together), so the numbers match it.
"""

from __future__ import annotations

import numpy as np


def _curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Cumulative true and false positives at each distinct threshold, highest score first.

    Returns:
        (tp, fp, positives, negatives); tp[i], fp[i] count the samples with score >= the i-th distinct score.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {scores.shape} vs {labels.shape}")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    # The last index of each run of equal scores: the curve moves once per distinct threshold.
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return tp, fp, int(y.sum()), int(y.size - y.sum())


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids, so ties count half); NaN when one class is missing."""
    tp, fp, pos, neg = _curve(scores, labels)
    if pos == 0 or neg == 0:
        return float("nan")
    tpr = np.r_[0.0, tp / pos]
    fpr = np.r_[0.0, fp / neg]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _precision_recall(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Precision and recall at each distinct threshold, highest first; None without positives."""
    tp, fp, pos, _ = _curve(scores, labels)
    if pos == 0:
        return None
    return tp / (tp + fp), tp / pos


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision: sum over thresholds of (recall step) x precision, as scikit-learn defines it."""
    curve = _precision_recall(scores, labels)
    if curve is None:
        return float("nan")
    precision, recall = curve
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """The best F1 over all thresholds (the localisation literature's F1-max)."""
    curve = _precision_recall(scores, labels)
    if curve is None:
        return float("nan")
    precision, recall = curve
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return float(f1.max())


def detection_metrics(scores: np.ndarray, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """AUROC, AP and F1-max under one prefix (`image_` or `pixel_`)."""
    return {
        f"{prefix}auroc": auroc(scores, labels),
        f"{prefix}ap": average_precision(scores, labels),
        f"{prefix}f1_max": f1_max(scores, labels),
    }

"""Metrics shared by every paper (percentages unless said otherwise)."""
from __future__ import annotations

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def accuracy(pred, labels) -> float:
    """Top-1 accuracy (%) of predicted class indices."""
    pred, labels = _np(pred), _np(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"pred shape {pred.shape} != labels shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("accuracy of an empty set")
    return float((pred == labels).mean() * 100)


def topk_accuracy(logits, labels, k: int = 1) -> float:
    logits, labels = _np(logits), _np(labels)
    topk = np.argsort(-logits, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean() * 100)


def per_class_accuracy(pred, labels, num_classes: int) -> np.ndarray:
    """Accuracy (%) per class; NaN for classes absent from `labels`."""
    pred, labels = _np(pred), _np(labels)
    correct = np.bincount(labels[pred == labels], minlength=num_classes).astype(float)
    total = np.bincount(labels, minlength=num_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / total * 100, np.nan)


def mean_per_class_accuracy(pred, labels, num_classes: int) -> float:
    return float(np.nanmean(per_class_accuracy(pred, labels, num_classes)))


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN / (B + N) (CoCoOp's base-to-novel summary); 0 when both are 0."""
    if base < 0 or novel < 0:
        raise ValueError("harmonic mean of negative accuracies")
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def average_precision(scores, targets) -> float:
    """Non-interpolated AP (%) of one class: mean precision at each positive's rank (ties broken by order)."""
    scores, targets = _np(scores).astype(float), _np(targets).astype(bool)
    if targets.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = targets[order]
    precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at_k[hits].mean() * 100)


def mean_average_precision(scores, targets) -> float:
    """mAP (%) over classes with at least one positive: scores and targets are (N, K)."""
    scores, targets = _np(scores), _np(targets)
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ")
    aps = [average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])]
    return float(np.nanmean(aps))


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    pred, target = _np(pred).ravel(), _np(target).ravel()
    keep = (target != ignore_index) if ignore_index is not None else np.ones_like(target, bool)
    keep &= (target >= 0) & (target < num_classes)
    idx = target[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def mean_iou(pred, target, num_classes: int, ignore_index: int | None = None) -> float:
    """mIoU (%) over classes present in prediction or target (mmseg's convention of ignoring NaN)."""
    cm = confusion_matrix(pred, target, num_classes, ignore_index).astype(float)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return float(np.nanmean(iou) * 100)

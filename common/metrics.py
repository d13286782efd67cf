"""Metrics shared by every paper (percentages unless said otherwise)."""
from __future__ import annotations

import numpy as np
import torch

# A dataset where zero-shot CLIP scores below this many times chance decides no claim (the verdict engine leaves it
# out), and the embedded world is calibrated so that every classification set clears it on both towers.
NEAR_CHANCE = 2.0


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


def iou_per_class(cm) -> np.ndarray:
    """Per-class IoU (%) from a (K, K) confusion matrix (rows: target, columns: prediction), summed over any
    number of images as mmseg accumulates it; NaN where a class is neither in the target nor predicted."""
    cm = _np(cm).astype(float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union * 100


def miou_from_confusion(cm, classes=None) -> float:
    """mIoU (%) of an accumulated confusion matrix over `classes` (default all), NaN classes left out."""
    iou = iou_per_class(cm)
    iou = iou if classes is None else iou[np.asarray(classes, dtype=np.int64)]
    if np.isnan(iou).all():
        raise ValueError("no class occurs in the target or the prediction: mIoU is undefined")
    return float(np.nanmean(iou))


def mean_iou(pred, target, num_classes: int, ignore_index: int | None = None) -> float:
    """mIoU (%) over classes present in prediction or target (mmseg's convention of ignoring NaN)."""
    return miou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


# ------------------------------------------------------------------------------------------ hierarchical
# Taxonomic open-set metrics (ProTeCt, gina9726/ProTeCt `metrics.py`, `engine.py`, `test.py`). A taxonomy is
# given over the *scored* nodes (every node but the root, one column of `scores` each): `parent[j]` is the
# column of node j's parent, or -1 when j is a child of the root (the root is never a label); `leaf_nodes[k]`
# is the column of leaf class k (the dataset label k).


def _path_children(parent, leaf_nodes) -> dict[int, np.ndarray]:
    """{internal node (-1 = root): (K,) the child on leaf k's root-to-leaf path, or -1 if off the path}."""
    parent, leaf_nodes = np.asarray(parent, dtype=np.int64), np.asarray(leaf_nodes, dtype=np.int64)
    n = len(parent)
    if ((parent < -1) | (parent >= n)).any():
        raise ValueError(f"parent indices must lie in [-1, {n - 1}]")
    if ((leaf_nodes < 0) | (leaf_nodes >= n)).any():
        raise ValueError(f"leaf_nodes must index the {n} scored nodes")
    if np.isin(leaf_nodes, parent).any():
        raise ValueError("a leaf class node has children in `parent`: leaves must be leaves of the tree")
    out = {int(p): np.full(len(leaf_nodes), -1, dtype=np.int64) for p in np.unique(parent)}
    for k, node in enumerate(leaf_nodes):
        for _ in range(n + 1):
            up = int(parent[node])
            out[up][k] = node
            if up == -1:
                break
            node = up
        else:
            raise ValueError(f"`parent` has a cycle above leaf class {k}")
    return out


def leaf_accuracy(scores, labels, leaf_nodes=None) -> float:
    """Leaf accuracy (%): top-1 over the leaf classes, i.e. argmax of scores[:, leaf_nodes] (of `scores`
    itself when `leaf_nodes` is None) against the leaf labels."""
    scores = _np(scores)
    if leaf_nodes is not None:
        scores = scores[:, np.asarray(leaf_nodes, dtype=np.int64)]
    return accuracy(scores.argmax(axis=1), _np(labels))


def hierarchical_consistent_accuracy(scores, labels, parent, leaf_nodes) -> float:
    """HCA (%): an image counts as correct only if its leaf prediction (argmax over all leaf classes) is
    right *and*, at every internal node on its ground-truth root-to-leaf path (the root included), the
    argmax over that node's children is the child on the path. `scores` (N, n_nodes) over all scored nodes."""
    scores, labels = _np(scores), _np(labels).astype(np.int64)
    parent = np.asarray(parent, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[1] != len(parent):
        raise ValueError(f"scores must be (N, {len(parent)}) over every scored node, got {scores.shape}")
    if labels.size == 0:
        raise ValueError("HCA of an empty set")
    path = _path_children(parent, leaf_nodes)
    correct = scores[:, np.asarray(leaf_nodes, dtype=np.int64)].argmax(axis=1) == labels
    for node, on_path in path.items():
        kids = np.flatnonzero(parent == node)
        pred = kids[scores[:, kids].argmax(axis=1)]
        truth = on_path[labels]
        correct &= (truth < 0) | (pred == truth)
    return float(correct.mean() * 100)


def tree_cut_accuracy(scores, labels, cut_nodes, leaf_to_cut) -> float:
    """Top-1 (%) on the label set of one tree cut: argmax over scores[:, cut_nodes] against the cut node
    that contains the true leaf (`leaf_to_cut[k]` indexes `cut_nodes`)."""
    scores, labels = _np(scores), _np(labels).astype(np.int64)
    cut_nodes, leaf_to_cut = np.asarray(cut_nodes, dtype=np.int64), np.asarray(leaf_to_cut, dtype=np.int64)
    if ((leaf_to_cut < 0) | (leaf_to_cut >= len(cut_nodes))).any():
        raise ValueError(f"leaf_to_cut must index the {len(cut_nodes)} nodes of the cut")
    return accuracy(scores[:, cut_nodes].argmax(axis=1), leaf_to_cut[labels])


def mean_tree_cut_accuracy(scores, labels, cuts) -> float:
    """MTA (%): mean of `tree_cut_accuracy` over a fixed list of cuts, each (cut_nodes, leaf_to_cut)."""
    cuts = list(cuts)
    if not cuts:
        raise ValueError("MTA needs at least one tree cut")
    return float(np.mean([tree_cut_accuracy(scores, labels, nodes, mapping) for nodes, mapping in cuts]))

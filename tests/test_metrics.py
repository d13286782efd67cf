import math

import numpy as np
import pytest

from common import metrics


def test_accuracy_and_per_class():
    pred, y = [0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 0]
    assert metrics.accuracy(pred, y) == pytest.approx(4 / 6 * 100)
    pc = metrics.per_class_accuracy(pred, y, 4)
    assert pc[:3] == pytest.approx([50.0, 100.0, 200 / 3]) and math.isnan(pc[3])
    assert metrics.mean_per_class_accuracy(pred, y, 4) == pytest.approx((50 + 100 + 200 / 3) / 3)
    with pytest.raises(ValueError):
        metrics.accuracy([1, 2], [1])


def test_harmonic_mean():
    assert metrics.harmonic_mean(82.69, 63.22) == pytest.approx(71.66, abs=0.01)  # CoOp row of CoCoOp Table 1
    assert metrics.harmonic_mean(0, 0) == 0


def test_average_precision_hand_computed():
    # ranks of positives: 1 and 3 -> precisions 1/1 and 2/3 -> AP = 5/6
    assert metrics.average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(500 / 6)
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.7, 0.2], [0.1, 0.9]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    # class 1: positives at ranks 1 and 2 -> AP 100
    assert metrics.mean_average_precision(scores, targets) == pytest.approx((500 / 6 + 100) / 2)


def test_topk():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.04, 0.06]])
    assert metrics.topk_accuracy(logits, [2, 1], k=1) == 0
    assert metrics.topk_accuracy(logits, [2, 1], k=2) == 50


def test_mean_iou_hand_computed():
    target = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    # class 0: inter 1, union 3 (pred 0 at two places, target 0 at two) -> 1/3
    # class 1: inter 2, union 3 -> 2/3 ; class 2: inter 0, union 1 (target only, pred 2 sits on ignore) -> 0
    assert metrics.mean_iou(pred, target, 3, ignore_index=255) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3 * 100)


def test_miou_from_accumulated_confusion_equals_one_pass_and_subsets_classes():
    """Two images' confusion matrices summed give the mIoU of both images at once (mmseg accumulates over the
    dataset, not per image); `classes` averages a subset (e.g. the dataset's own classes under a larger vocabulary)."""
    t1, p1 = np.array([0, 0, 1, 255]), np.array([0, 1, 1, 2])
    t2, p2 = np.array([2, 2, 1]), np.array([2, 0, 3])
    cm = metrics.confusion_matrix(p1, t1, 4, 255) + metrics.confusion_matrix(p2, t2, 4, 255)
    both = metrics.mean_iou(np.r_[p1, p2], np.r_[t1, t2], 4, ignore_index=255)
    assert metrics.miou_from_confusion(cm) == pytest.approx(both)
    # class 0: inter 1, union 3; class 1: inter 1, union 3; class 2: inter 1, union 2; class 3: predicted only -> 0
    iou = metrics.iou_per_class(cm)
    assert iou == pytest.approx([100 / 3, 100 / 3, 50, 0])
    assert metrics.miou_from_confusion(cm, classes=[0, 1, 2]) == pytest.approx((100 / 3 + 100 / 3 + 50) / 3)
    with pytest.raises(ValueError, match="undefined"):
        metrics.miou_from_confusion(np.zeros((3, 3)))

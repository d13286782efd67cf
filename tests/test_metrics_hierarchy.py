"""Hierarchical metrics (leaf accuracy, HCA, tree-cut accuracy, MTA) against hand-computed examples.

The tree (scored columns 0..6; the root is not scored):

    root -+- angular(0) -+- polygon(1) -+- red square(2)    class 0
          |              |              +- blue triangle(3) class 2
          |              +- yellow star(4)                  class 3
          +- curved(5) --+- green circle(6)                 class 1
"""
import numpy as np
import pytest
import torch

from common import metrics

PARENT = [-1, 0, 1, 1, 0, -1, 5]
LEAF_NODES = [2, 6, 3, 4]
#                   ang pol red blue star cur circ
SCORES = np.array([[2., 1., 3., 1., 0., 0., 0.],     # class 0: everything right
                   [0., 1., 3., 1., 0., 2., -1.],    # class 0: leaf right, root picks curved
                   [0., 0., 0., 4., 0., 3., 1.],     # class 1: leaf wrong (blue), root right
                   [3., 0., 0., 0., 2., 0., 0.]])    # class 3: leaf right, angular -> star right
LABELS = np.array([0, 0, 1, 3])


def test_leaf_accuracy_and_hca_by_hand():
    assert metrics.leaf_accuracy(SCORES, LABELS, LEAF_NODES) == pytest.approx(75.0)
    assert metrics.leaf_accuracy(SCORES[:, LEAF_NODES], LABELS) == pytest.approx(75.0)
    # rows 1 and 4 are consistent along their whole path; row 2 fails at the root, row 3 at the leaf
    assert metrics.hierarchical_consistent_accuracy(SCORES, LABELS, PARENT, LEAF_NODES) == pytest.approx(50.0)
    # torch inputs give the same
    assert metrics.hierarchical_consistent_accuracy(torch.tensor(SCORES), torch.tensor(LABELS), PARENT,
                                                    LEAF_NODES) == pytest.approx(50.0)


def test_hca_fails_an_image_for_a_wrong_inner_node_even_with_the_leaf_right():
    s = SCORES[[0]].copy()
    assert metrics.hierarchical_consistent_accuracy(s, LABELS[[0]], PARENT, LEAF_NODES) == 100.0
    s[0, 3] = 2.5   # polygon's children still pick red (3 > 2.5): consistent
    assert metrics.hierarchical_consistent_accuracy(s, LABELS[[0]], PARENT, LEAF_NODES) == 100.0
    s[0, 1] = -1.0  # angular's children pick star (0 > -1) while the leaf stays red: inconsistent
    assert metrics.leaf_accuracy(s, LABELS[[0]], LEAF_NODES) == 100.0
    assert metrics.hierarchical_consistent_accuracy(s, LABELS[[0]], PARENT, LEAF_NODES) == 0.0


def test_tree_cut_accuracy_and_mta_by_hand():
    top = ([0, 5], [0, 1, 0, 0])            # {angular, curved}: row 2 picks curved for a square -> 3/4
    mixed = ([0, 6], [0, 1, 0, 0])          # {angular, green circle}: all four right
    assert metrics.tree_cut_accuracy(SCORES, LABELS, *top) == pytest.approx(75.0)
    assert metrics.tree_cut_accuracy(SCORES, LABELS, *mixed) == pytest.approx(100.0)
    assert metrics.mean_tree_cut_accuracy(SCORES, LABELS, [top, mixed]) == pytest.approx(87.5)
    leaves = ([2, 3, 4, 6], [0, 3, 1, 2])   # the leaf cut is leaf accuracy
    assert metrics.tree_cut_accuracy(SCORES, LABELS, *leaves) == pytest.approx(75.0)


def _hca_reference(scores, labels, parent, leaf_nodes):
    """The official accumulation (`hierConsistency`): a per-sample flag, OR-ed with every node classifier's
    mistakes over the samples below that node, and with the leaf classifier's."""
    parent = np.asarray(parent)
    wrong = scores[:, leaf_nodes].argmax(1) != labels
    for node in sorted(set(parent.tolist())):
        kids = np.flatnonzero(parent == node)
        for i, y in enumerate(labels):
            path, j = [], leaf_nodes[y]
            while j != -1:
                path.append(j)
                j = parent[j]
            if node != -1 and node not in path:
                continue
            truth = [k for k in kids if k in path][0]
            wrong[i] |= kids[scores[i, kids].argmax()] != truth
    return 100.0 * (~wrong).mean()


def test_hca_matches_the_per_node_reference_and_never_exceeds_leaf_accuracy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.normal(size=(40, 7))
        y = rng.integers(0, 4, size=40)
        hca = metrics.hierarchical_consistent_accuracy(s, y, PARENT, LEAF_NODES)
        assert hca == pytest.approx(_hca_reference(s, y, PARENT, LEAF_NODES))
        assert hca <= metrics.leaf_accuracy(s, y, LEAF_NODES) + 1e-9


def test_flat_label_set_hca_is_leaf_accuracy():
    s = np.random.default_rng(1).normal(size=(30, 5))
    y = np.arange(30) % 5
    assert metrics.hierarchical_consistent_accuracy(s, y, [-1] * 5, list(range(5))) == \
        pytest.approx(metrics.leaf_accuracy(s, y))


def test_bad_trees_and_cuts_are_errors():
    with pytest.raises(ValueError, match="leaves"):
        metrics.hierarchical_consistent_accuracy(SCORES, LABELS, PARENT, [2, 6, 3, 0])   # angular has children
    with pytest.raises(ValueError, match="cycle"):
        metrics.hierarchical_consistent_accuracy(SCORES, LABELS, [1, 0, 1, 1, 0, -1, 5], LEAF_NODES)
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        metrics.hierarchical_consistent_accuracy(SCORES[:, :6], LABELS, PARENT, LEAF_NODES)
    with pytest.raises(ValueError, match="index"):
        metrics.tree_cut_accuracy(SCORES, LABELS, [0, 5], [0, 2, 0, 0])
    with pytest.raises(ValueError, match="at least one"):
        metrics.mean_tree_cut_accuracy(SCORES, LABELS, [])

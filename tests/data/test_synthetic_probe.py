"""The room-for-transfer probe: its base-half columns are the base-to-novel split's zero-shot and probe."""
from __future__ import annotations

import math

import numpy as np
import pytest

from common.data import build_dataset, subsample_classes
from common.data.synthetic import suite
from common.data.synthetic.probe import base_table, image_features, probe_dataset, text_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def test_base_half_matches_cocoop_base_split(tmp_path, tiny_rn):
    root = tmp_path / "embedded"
    suite.write_suite(root, seed=3, only=["emb_counting"], scale=0.05, progress=False)
    row = probe_dataset(tiny_rn, "emb_counting", root, shots=2, seed=1)
    full = build_dataset("emb_counting", root)
    base = subsample_classes(full, "base")   # the split base-to-novel training uses, relabelled from 0
    assert row["base_classes"] == len(base.classnames) == math.ceil(full.num_classes / 2)
    feats = image_features(tiny_rn, [d.impath for d in base.test])
    pred = (feats @ text_classifier(tiny_rn, base.classnames, base.template).T).argmax(1).numpy()
    assert row["zero_shot_base"] == pytest.approx(float((pred == np.array([d.label for d in base.test])).mean()))
    assert 0.0 <= row["linear_probe_base"] <= 1.0 and row["C_base"] > 0


def test_base_table_lists_sets_with_a_base_half():
    rows = {"tiny-rn": [{"dataset": "emb_objects", "base_classes": 26, "zero_shot_base": 0.5, "linear_probe_base": 0.625},
                        {"dataset": "emb_objects_v2", "linear_probe": None}],
            "tiny-vit": [{"dataset": "emb_objects", "base_classes": 26, "zero_shot_base": 0.4, "linear_probe_base": 0.45}]}
    lines = base_table(rows).splitlines()
    assert lines[0].startswith("| dataset | base classes | tiny-rn zero-shot")
    assert lines[2:] == ["| emb_objects | 26 | 50.0 | 62.5 | 40.0 | 45.0 |"]

"""Leaderboard: the shared grid, hand-computed averages, DVC metrics/plots files, determinism."""
import json

import pytest

from common.engine.runs import load_records
from common.report.leaderboard import Leaderboard, write_leaderboard
from common.report.records import harmonic
from tests.report.builders import DATASETS, rec, world


def build(root):
    lb = Leaderboard(load_records(root))
    return lb.build(), lb.metrics


def test_averages_on_the_shared_grid(tmp_path):
    world(tmp_path)
    text, m = build(tmp_path)
    assert m["fewshot/tiny-rn/linear_probe/k1"] == 30.0 and m["fewshot/tiny-rn/linear_probe/k16"] == 58.0
    assert m["fewshot/tiny-rn/coop-m16/k16"] == 63.0
    assert m["fewshot/tiny-rn/zeroshot_clip-single/k0"] == 50.0            # zero-shot reference, same datasets
    assert m["base2novel/tiny-rn/cocoop-k16/hm"] == pytest.approx(harmonic(78.0, 50.0), abs=1e-4)
    assert m["domain_generalization/tiny-rn/linear_probe-k16/source"] == 52.0
    assert m["domain_generalization/tiny-rn/linear_probe-k16/target_avg"] == 34.0
    assert m["domain_generalization/tiny-rn/zeroshot_clip-single/target_avg"] == 32.5   # seed-0 run joins the grid
    assert m["zeroshot/tiny-rn/zeroshot_clip-ensemble/avg"] == 52.0
    assert "Shared grid: datasets emb_objects, emb_scenes, emb_textures; shots 1, 2, 4, 8, 16; seeds 1, 2, 3." in text
    assert "| coop (m16) | — | 35.00 ± 1.00 |" in text
    # rows sorted by the last column: coop above linear_probe
    assert text.index("| coop (m16) |") < text.index("| linear_probe |")
    assert "Absolute numbers are not comparable with the paper" in text


def test_incomplete_method_is_listed_apart_not_shrinking_the_grid(tmp_path):
    world(tmp_path)
    rec(tmp_path, "tip_adapter", DATASETS[0], {"top1": 99.0}, shots=16, seed=1)
    text, m = build(tmp_path)
    assert "fewshot/tiny-rn/tip_adapter/k16" not in m
    assert m["fewshot/tiny-rn/linear_probe/k1"] == 30.0
    assert "Not listed: tip_adapter (lacks emb_objects k=1 seed 1, emb_objects k=1 seed 2, emb_objects k=1 seed 3 and 41 more)." in text


def test_two_methods_share_their_common_seeds(tmp_path):
    for ds in ("a", "b"):
        for s in (1, 2, 3):
            rec(tmp_path, "m1", ds, {"top1": 10.0 * s}, shots=16, seed=s)
            if s < 3:
                rec(tmp_path, "m2", ds, {"top1": 5.0 * s}, shots=16, seed=s)
    text, m = build(tmp_path)
    assert m["fewshot/tiny-rn/m1/k16"] == 15.0          # seeds 1, 2 only: (10 + 20) / 2
    assert m["fewshot/tiny-rn/m2/k16"] == 7.5
    assert "seeds 1, 2." in text and "Not listed" not in text


def test_a_training_free_method_with_several_seeds_is_seeded(tmp_path):
    # no shots but one run per seed (random test-time augmentations): matched seed by seed, std over seeds
    for s, v in zip((1, 2, 3), (50.0, 52.0, 54.0)):
        rec(tmp_path, "tpt", "a", {"top1": v}, protocol="test_time", seed=s)
        rec(tmp_path, "coop", "a", {"top1": 40.0 + s}, protocol="test_time", shots=16, seed=s, source="b")
    rec(tmp_path, "zeroshot_clip", "a", {"top1": 45.0}, protocol="test_time", seed=0)
    text, m = build(tmp_path)
    assert m["test_time/tiny-rn/tpt/avg"] == 52.0 and m["test_time/tiny-rn/zeroshot_clip/avg"] == 45.0
    assert "| tpt | 52.00 ± 2.00 |" in text


def test_files_for_dvc_and_determinism(tmp_path):
    runs = world(tmp_path / "runs")
    p1 = write_leaderboard(runs, tmp_path / "a")
    write_leaderboard(runs, tmp_path / "b")
    for name in ("leaderboard.md", "leaderboard.json", "plots/fewshot.json", "leaderboard_fewshot_tiny-rn.png",
                 "leaderboard_base2novel_tiny-rn.png", "leaderboard_domain_generalization_tiny-rn.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    metrics = json.loads(p1["json"].read_text())
    assert all(isinstance(v, float) for v in metrics.values()) and list(metrics) == sorted(metrics)
    rows = json.loads(p1["plot"].read_text())
    assert rows[0].keys() == {"backbone", "method", "shots", "metric", "value", "std"}
    lp = [(r["shots"], r["value"], r["std"]) for r in rows if r["method"] == "linear_probe"]
    assert lp == [(1, 30.0, 1.0), (2, 34.0, 1.0), (4, 38.0, 1.0), (8, 42.0, 1.0), (16, 58.0, 1.0)]
    zs = [(r["shots"], r["value"], r["std"]) for r in rows if r["method"] == "zeroshot_clip (single), zero-shot"]
    assert zs == [(0, 50.0, None)]
    assert "![leaderboard_fewshot_tiny-rn](leaderboard_fewshot_tiny-rn.png)" in p1["md"].read_text()


def test_no_runs(tmp_path):
    paths = write_leaderboard(tmp_path / "runs", tmp_path / "out")
    assert "No embedded-profile run records yet." in paths["md"].read_text()
    assert json.loads(paths["json"].read_text()) == {}


def test_test_selected_rows_are_never_ranked_and_sweeps_collapse(tmp_path):
    world(tmp_path)
    for i, ds in enumerate(DATASETS):
        rec(tmp_path, "calip", ds, {"top1": 99.0}, protocol="zeroshot", variant="test_oracle", seed=0,
            selected_on="test")
        for a, val in ((0.5, 60.0), (0.9, 70.0), (0.1, 10.0)):
            for s in (1, 2, 3):
                rec(tmp_path, "wise", ds, {"top1": val}, shots=16, seed=s, variant=f"a{a}",
                    sweep={"param": "alpha", "value": a, "default": a == 0.5},
                    **({"selected_on": "val"} if a == 0.9 else {}))
    text, m = build(tmp_path)
    assert "calip (test_oracle)" not in text.split("Not ranked")[0].split("## zeroshot")[1]
    assert "Not ranked (setting chosen on the test split): calip (test_oracle) 99.00." in text
    assert "zeroshot/tiny-rn/calip-test_oracle/avg" not in m
    assert "| wise (a0.5) | — | 60.00 ± 0.00 |" in text and "| wise (a0.9) | — | 70.00 ± 0.00 |" in text
    assert "| wise (a0.1)" not in text and "the 1 other settings (wise (a0.1))" in text
    paths = write_leaderboard(tmp_path, tmp_path / "out")
    full = (tmp_path / "out" / "leaderboard_sweeps.md").read_text()
    assert full.startswith("# Leaderboard with every sweep setting") and "wise (a0.1)" in full
    assert "[leaderboard_sweeps.md](leaderboard_sweeps.md)" in paths["md"].read_text()


def test_rows_with_and_without_a_shot_count_in_one_protocol(tmp_path):
    # DualCoOp: zero-shot multi-label runs (no shots) beside partial-label runs (shots = % of labels kept)
    for s in (1, 2):
        rec(tmp_path, "dualcoop", "a", {"mAP": 30.0 + s}, protocol="multilabel", seed=s)
        rec(tmp_path, "dualcoop", "a", {"mAP": 40.0 + s}, protocol="multilabel", shots=10, seed=s)
    text, m = build(tmp_path)
    assert "| dualcoop, k=10 | 41.50 ± 0.71 |" in text and "| dualcoop | 31.50 ± 0.71 |" in text

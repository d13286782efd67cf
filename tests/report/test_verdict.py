"""Claim verdicts on hand-made run records: every verdict state and the averaging rules."""
import copy
from pathlib import Path

import pytest

from common.engine.runs import load_records
from common.report.records import harmonic
from common.report.schema import load_paper, parse_paper
from common.report.verdict import (INCONCLUSIVE, NOT_REPRODUCED, NOT_TESTABLE, PREMISE_NOT_MET, REPRODUCED,
                                   evaluate_claim, evaluate_paper)
from tests.report.builders import rec, world

REPO = Path(__file__).resolve().parents[2]
BASE = {"slug": "demo", "title": "T", "authors": ["A"], "venue": "V", "year": 2022, "arxiv": None,
        "official_repo": None, "reported": [], "backbone": "RN50"}


def paper(*checks, protocol="fewshot", **extra):
    claims = [{"id": f"c{i}", "text": "t", "protocol": protocol, "check": c, "source": "project",
               **({"scale_free": "a test of the engine"} if i == 0 else {})} for i, c in enumerate(checks)]
    return parse_paper({**copy.deepcopy(BASE), "claims": claims, **extra})


def verdict(root, check, protocol="fewshot", profile="embedded", **extra):
    p = paper(check, protocol=protocol, **extra)
    return evaluate_claim(p.claims[0], p, load_records(root), profile)


def test_terms_are_compared_on_the_seeds_they_all_ran(tmp_path):
    # m ran seeds 1-3 on both datasets, b only seed 1: the matched grid compares seed 1 alone
    for s, v in zip((1, 2, 3), (10.0, 20.0, 30.0)):
        rec(tmp_path, "m", "a", {"top1": v}, shots=16, seed=s)
        rec(tmp_path, "m", "b", {"top1": v + 40}, shots=16, seed=s)
    rec(tmp_path, "n", "a", {"top1": 5.0}, shots=16, seed=1)
    rec(tmp_path, "n", "b", {"top1": 45.0}, shots=16, seed=1)
    v = verdict(tmp_path, "mean(top1, method=m, shots=16) > mean(top1, method=n, shots=16)")
    assert v.seeds == [1] and [t.value for t in v.terms] == [30.0, 25.0]     # seed 1 only: (10 + 50) / 2
    assert v.terms[0].seeds == {"a": [1], "b": [1]}
    assert any("also ran seed(s) 2, 3" in n for n in v.notes)
    assert v.holds and v.status == REPRODUCED                                # +5 on both datasets
    # with every term on seeds 1-3 the seed means are averaged first, then the datasets
    for s in (2, 3):
        rec(tmp_path, "n", "a", {"top1": 5.0}, shots=16, seed=s)
        rec(tmp_path, "n", "b", {"top1": 45.0}, shots=16, seed=s)
    v = verdict(tmp_path, "mean(top1, method=m, shots=16) > mean(top1, method=n, shots=16)")
    assert v.seeds == [1, 2, 3] and [t.value for t in v.terms] == [40.0, 25.0]


def test_only_datasets_present_for_all_terms_are_compared(tmp_path):
    for ds, a, b in (("x", 50.0, 40.0), ("y", 70.0, 60.0), ("z", 10.0, None)):
        rec(tmp_path, "a", ds, {"top1": a}, shots=4)
        if b is not None:
            rec(tmp_path, "b", ds, {"top1": b}, shots=4)
    v = verdict(tmp_path, "mean(top1, method=a, shots=4) > mean(top1, method=b, shots=4) + 9.9")
    assert v.status == REPRODUCED                       # 60 > 50 + 9.9 on {x, y}; with z, a's mean would be 43.3
    assert v.datasets == {"": ["x", "y"]}
    assert v.dropped == {"z": ["mean(top1, method=b, shots=4)"]}
    assert [t.value for t in v.terms] == [60.0, 50.0]


def test_terms_at_different_shot_counts_need_pinned_shots(tmp_path):
    for s in (1, 2, 3):
        rec(tmp_path, "a", "x", {"top1": 60.0 + s}, shots=16, seed=s)
        rec(tmp_path, "b", "x", {"top1": 50.0 + s}, shots=8, seed=s)
    v = verdict(tmp_path, "mean(top1, method=a) > mean(top1, method=b)")
    assert v.status == NOT_TESTABLE and "different shot counts" in v.reason and "at 8 shots" in v.reason
    v = verdict(tmp_path, "mean(top1, method=a, shots=16) > mean(top1, method=b, shots=8)")
    assert v.status == REPRODUCED and v.shots == [8, 16]


def test_a_difference_inside_seed_noise_is_inconclusive(tmp_path):
    # a beats b on average (+0.5) but b wins on seed 2: a paired resample does not exclude the opposite sign
    for s, (a, b) in enumerate([(52.0, 50.0), (49.0, 50.5), (51.0, 50.0)], start=1):
        rec(tmp_path, "a", "x", {"top1": a}, shots=16, seed=s)
        rec(tmp_path, "b", "x", {"top1": b}, shots=16, seed=s)
    v = verdict(tmp_path, "mean(top1, method=a, shots=16) > mean(top1, method=b, shots=16)")
    assert v.holds and v.status == INCONCLUSIVE
    assert v.noise.low < 0 < v.noise.high and v.noise.margin == pytest.approx(0.5)
    assert v.noise.per_seed == {1: True, 2: False, 3: True} and v.noise.stability == "fragile"
    assert "inside run-to-run noise" in v.reason and "95% interval" in v.reason
    # the same +0.5 on every seed is beyond noise; a loss on every seed is "not reproduced"
    v = verdict(tmp_path, "mean(top1, method=a, shots=16) > mean(top1, method=b, shots=16) + 3")
    assert not v.holds and v.status == NOT_REPRODUCED and v.noise.high < 0
    steady = tmp_path / "steady"
    for s in (1, 2, 3):
        rec(steady, "a", "x", {"top1": 50.5 + s}, shots=16, seed=s)
        rec(steady, "b", "x", {"top1": 50.0 + s}, shots=16, seed=s)
    v = verdict(steady, "mean(top1, method=a, shots=16) > mean(top1, method=b, shots=16)")
    assert v.status == REPRODUCED and v.noise.stability == "stable" and v.noise.low == pytest.approx(0.5)


def test_one_seed_on_one_dataset_is_inconclusive(tmp_path):
    rec(tmp_path, "a", "x", {"top1": 70.0}, shots=16, seed=1)
    rec(tmp_path, "b", "x", {"top1": 50.0}, shots=16, seed=1)
    v = verdict(tmp_path, "mean(top1, method=a, shots=16) > mean(top1, method=b, shots=16)")
    assert v.holds and v.status == INCONCLUSIVE and "noise is unknown" in v.reason
    # untrained (zero-shot) terms are deterministic: one record decides
    rec(tmp_path, "z", "x", {"top1": 40.0}, protocol="zeroshot", seed=0)
    rec(tmp_path, "y", "x", {"top1": 30.0}, protocol="zeroshot", seed=0)
    v = verdict(tmp_path, "mean(top1, method=z) > mean(top1, method=y)", protocol="zeroshot")
    assert v.status == REPRODUCED and v.noise.stability == "deterministic"


def test_replicates_without_shots_are_resampled(tmp_path):
    """A deterministic method scored on seeded folds of its test set (or a seeded run without a shot count) has
    several seeds per cell: they are replicates, so a difference inside their spread is inconclusive, not decided
    by the first seed alone; a clear one is reproduced and its stability is judged per seed."""
    for s, (a, b) in zip((1, 2, 3), ((12.0, 10.0), (9.0, 10.0), (11.0, 10.5))):
        rec(tmp_path, "a", "x", {"miou": a}, protocol="segmentation", seed=s)
        rec(tmp_path, "b", "x", {"miou": b}, protocol="segmentation", seed=s)
    v = verdict(tmp_path, "mean(miou, method=a) > mean(miou, method=b)", protocol="segmentation")
    assert v.holds and v.status == INCONCLUSIVE and v.seeds == [1, 2, 3]
    assert v.terms[0].value == pytest.approx(32 / 3)                        # the mean over the three folds
    assert v.noise.stability == "fragile"
    for s in (1, 2, 3):
        rec(tmp_path, "c", "x", {"miou": 20.0 + s}, protocol="segmentation", seed=s)
    v = verdict(tmp_path, "mean(miou, method=c) > mean(miou, method=b)", protocol="segmentation")
    assert v.status == REPRODUCED and v.noise.stability == "stable"


def test_a_training_free_term_with_several_seeds_is_resampled_over_them(tmp_path):
    # TPT-like runs: no shots, but three seeds of random augmentations; zero-shot: one arbitrary seed
    for ds, zs in (("x", 40.0), ("y", 60.0)):
        rec(tmp_path, "z", ds, {"top1": zs}, protocol="test_time", seed=0)
        for s, delta in zip((1, 2, 3), (3.0, -1.0, 1.0)):
            rec(tmp_path, "t", ds, {"top1": zs + delta}, protocol="test_time", seed=s)
    v = verdict(tmp_path, "mean(top1, method=t) > mean(top1, method=z)", protocol="test_time")
    assert v.seeds == [1, 2, 3] and [t.value for t in v.terms] == [51.0, 50.0]   # every seed, not seed 1 alone
    assert v.terms[0].seeds == {"x": [1, 2, 3], "y": [1, 2, 3]} and v.terms[1].seeds == {"x": [0], "y": [0]}
    assert v.noise.per_seed == {1: True, 2: False, 3: True} and v.status == INCONCLUSIVE   # seed 2 loses
    # matched with a trained term, the shared seeds are compared
    for ds in ("x", "y"):
        rec(tmp_path, "c", ds, {"top1": 45.0}, protocol="test_time", shots=16, seed=1)
    v = verdict(tmp_path, "mean(top1, method=t) > mean(top1, method=c, shots=16)", protocol="test_time")
    assert v.seeds == [1] and v.terms[0].value == 53.0


def test_near_chance_datasets_decide_nothing(tmp_path):
    # zero-shot on 'hard' (10 classes) is 15% < 2 x chance: the dataset is left out of the grid
    for ds, zs in (("easy", 60.0), ("hard", 15.0)):
        rec(tmp_path, "zeroshot_clip", ds, {"top1": zs}, protocol="zeroshot", seed=0, n_classes=10)
        for s in (1, 2, 3):
            rec(tmp_path, "a", ds, {"top1": 70.0 + s}, shots=16, seed=s)
            rec(tmp_path, "b", ds, {"top1": 60.0 + s if ds == "easy" else 90.0}, shots=16, seed=s)
    v = verdict(tmp_path, "all(per(top1, method=a, shots=16) > per(top1, method=b, shots=16))")
    assert v.status == REPRODUCED and v.datasets == {"": ["easy"]}
    assert v.near_chance == {"hard": "zero-shot 15.0% < 2 x chance 10.0%"}
    v = verdict(tmp_path, "mean(top1, method=a, shots=16, dataset=hard) > mean(top1, method=b, shots=16, dataset=hard)")
    assert v.status == INCONCLUSIVE and "near chance" in v.reason


def test_premise_not_met(tmp_path):
    # the claim's own check holds, but its premise (fine-tuning raises the reference accuracy) does not
    for s in (1, 2, 3):
        rec(tmp_path, "ft", "x", {"top1": 40.0 + s}, shots=16, seed=s)
        rec(tmp_path, "mix", "x", {"top1": 50.0 + s}, shots=16, seed=s)
    rec(tmp_path, "zs", "x", {"top1": 45.0}, protocol="fewshot", shots=16, seed=1)
    p = parse_paper({**copy.deepcopy(BASE), "claims": [
        {"id": "ft_helps", "text": "t", "protocol": "fewshot", "source": "project",
         "check": "mean(top1, method=ft, shots=16) > mean(top1, method=zs, shots=16)"},
        {"id": "mix_keeps", "text": "t", "protocol": "fewshot", "source": "project", "requires": ["ft_helps"],
         "check": "mean(top1, method=mix, shots=16) >= mean(top1, method=ft, shots=16)"}]})
    first, second = evaluate_paper(p, load_records(tmp_path), "embedded")
    assert first.status == INCONCLUSIVE or first.status == NOT_REPRODUCED
    assert second.status == PREMISE_NOT_MET and second.check_status == REPRODUCED
    assert second.premises == {"ft_helps": first.status} and "`ft_helps` is" in second.reason


def test_decided_by_shows_vector_steps(tmp_path):
    world(tmp_path)
    v = verdict(tmp_path, "all(per(top1, method=coop, variant=m16, by=shots) > per(top1, method=linear_probe, "
                          "by=shots) + 4.9) and argmax(per(top1, method=coop, variant=m16, by=shots)) == 16")
    kinds = [(s.op, s.kind) for s in v.steps]
    assert (">", "compare") in kinds and ("→", "reduce") in kinds
    vec = next(s for s in v.steps if s.op == ">")
    assert vec.left_value == {1: 35.0, 2: 39.0, 4: 43.0, 8: 47.0, 16: 63.0} and vec.result[16] is True
    red = [s for s in v.steps if s.kind == "reduce"]
    assert [s.left for s in red] == ["all(…)", "argmax(…)"] and red[1].result == 16


def test_per_dataset_counts(tmp_path):
    for ds, a, b in (("d1", 50, 40), ("d2", 50, 55), ("d3", 70, 60), ("d4", 30, 29.5)):
        for s in (1, 2, 3):     # the same numbers on every seed: no seed noise
            rec(tmp_path, "a", ds, {"top1": a}, shots=16, seed=s)
            rec(tmp_path, "b", ds, {"top1": b}, shots=16, seed=s)
    check = "count(per(top1, method=a, shots=16) > per(top1, method=b, shots=16) + 0.5) >= {}"
    assert verdict(tmp_path, check.format(2)).status == REPRODUCED     # d1, d3 (d4 only by 0.5: not > +0.5)
    assert verdict(tmp_path, check.format(3)).status == NOT_REPRODUCED
    v = verdict(tmp_path, "argmax(per(top1, method=a, shots=16) - per(top1, method=b, shots=16)) == d1")
    assert v.status == REPRODUCED and v.terms[0].value == {"d1": 50.0, "d2": 50.0, "d3": 70.0, "d4": 30.0}


@pytest.mark.parametrize("tol, holds", [(1.0, True), (0.99, False)])
def test_tolerance_boundary(tmp_path, tol, holds):
    for s, (a, b) in enumerate([(70.2, 71.0), (69.8, 71.0)], start=1):   # a = 70.0, b = 71.0 on average
        rec(tmp_path, "a", "d", {"top1": a}, shots=16, seed=s)
        rec(tmp_path, "b", "d", {"top1": b}, shots=16, seed=s)
    v = verdict(tmp_path, f"mean(top1, method=a, shots=16) >= mean(top1, method=b, shots=16) - {tol}")
    assert v.holds is holds and v.status == INCONCLUSIVE    # exactly at the boundary: inside the seed noise


def test_hm_is_the_harmonic_mean_of_averaged_base_and_novel(tmp_path):
    rec(tmp_path, "a", "d1", {"base": 90.0, "novel": 30.0, "hm": 45.0}, protocol="base2novel", shots=16)
    rec(tmp_path, "a", "d2", {"base": 50.0, "novel": 70.0, "hm": harmonic(50, 70)}, protocol="base2novel", shots=16)
    v = verdict(tmp_path, "mean(hm, method=a) > 0", protocol="base2novel")
    assert v.terms[0].value == pytest.approx(harmonic(70.0, 50.0))           # not (45 + 58.33) / 2
    assert v.terms[0].per_dataset["d1"] == pytest.approx(45.0)


def test_not_testable_states_and_their_reasons(tmp_path):
    world(tmp_path)
    cases = {
        "mean(top1, method=coop, variant=m16, shots=16) > 1": (NOT_TESTABLE, "no embedded-profile runs of protocol cross_dataset", "cross_dataset"),
        "mean(top1, method=coop, variant=m16, shots=16, protocol=base2novel) > 1": (
            NOT_TESTABLE, "no run records with protocol=base2novel among those with method=coop, variant=m16, shots=16 (present: fewshot)", "fewshot"),
        "mean(top1, method=maple, shots=16) > 1": (NOT_TESTABLE, "no run records with method=maple", "fewshot"),
        "mean(top1, method=cocoop, shots=16) > 1": (
            NOT_TESTABLE, "no run records with protocol=fewshot among those with method=cocoop, shots=16, "
                          "profile=embedded (present: base2novel)", "fewshot"),
        "mean(top1, method=zeroshot_clip) > 1": (NOT_TESTABLE, "mixes several variant values (ensemble, single)", "zeroshot"),
        "mean(top1, method=linear_probe) > 1": (NOT_TESTABLE, "mixes several shots values (1, 16, 2, 4, 8)", "fewshot"),
        "mean(top1, method=linear_probe, shots=32) > 1": (NOT_TESTABLE, "shots=32", "fewshot"),
        "mean(novel, method=linear_probe, shots=16) > 1": (NOT_TESTABLE, "metric 'novel' absent", "fewshot"),
    }
    for check, (status, reason, proto) in cases.items():
        v = verdict(tmp_path, check, protocol=proto)
        assert (v.status, check) == (status, check)
        assert reason in v.reason, (check, v.reason)
        assert not v.terms or v.status != REPRODUCED


def test_never_reproduced_when_a_needed_number_is_missing(tmp_path):
    world(tmp_path)
    # the left side alone would decide an `or`; the missing right side must still make it not testable
    v = verdict(tmp_path, "mean(top1, method=linear_probe, shots=16) > 0 or mean(top1, method=maple, shots=16) > 0")
    assert v.status == NOT_TESTABLE and "method=maple" in v.reason
    v = verdict(tmp_path, "mean(top1, method=linear_probe, shots=16) > 0", profile="real")
    assert v.status == NOT_TESTABLE and "no real-profile runs" in v.reason
    # chance level needs the class count in the records
    rec(tmp_path / "nc", "z", "d", {"top1": 50.0}, protocol="zeroshot", seed=0)
    v = verdict(tmp_path / "nc", "all(per(top1, method=z) > per(chance, method=z))", protocol="zeroshot")
    assert v.status == NOT_TESTABLE and "n_classes" in v.reason


def test_profile_restriction_and_untestable_claims(tmp_path):
    world(tmp_path)
    p = parse_paper({**copy.deepcopy(BASE), "claims": [
        {"id": "abs", "text": "t", "protocol": "fewshot", "profiles": ["real"], "source": "project",
         "check": "mean(top1, method=linear_probe, shots=16) >= 73"},
        {"id": "cost", "text": "t", "protocol": "fewshot", "untestable": "a wall-clock claim", "source": "project"}]})
    a, b = evaluate_paper(p, load_records(tmp_path), "embedded")
    assert (a.status, a.reason) == (NOT_TESTABLE, "judged on the real profile only")
    assert (b.status, b.reason) == (NOT_TESTABLE, "a wall-clock claim")


def test_backbone_stand_in_and_defaults(tmp_path):
    world(tmp_path, backbone="tiny-vit")
    check = "mean(top1, method=zeroshot_clip, protocol=zeroshot) > 0"
    v = verdict(tmp_path, check)                      # paper backbone RN50 -> tiny-rn: not run
    assert v.status == NOT_TESTABLE and "backbone=tiny-rn" in v.reason and "present: tiny-vit" in v.reason
    v = verdict(tmp_path, check, defaults={"zeroshot_clip": {"variant": "single"}}, embedded_backbone="tiny-vit")
    assert v.status == REPRODUCED and "variant=single" in v.terms[0].filters and v.terms[0].value == 50.0
    v = verdict(tmp_path, "mean(top1, method=zeroshot_clip, protocol=zeroshot, variant=ensemble, backbone='tiny-vit') == 52",
                defaults={"zeroshot_clip": {"variant": "single"}})
    assert v.holds and v.terms[0].value == 52.0       # a selection's own filters win over the defaults
    assert v.status == INCONCLUSIVE                   # an exact average is not robust to resampling the datasets


def test_source_and_target_pools_are_intersected_separately(tmp_path):
    world(tmp_path)
    check = ("mean(top1, method=zeroshot_clip, variant=single, role=source) - mean(top1, method=zeroshot_clip, "
             "variant=single, role=target) < mean(top1, method=linear_probe, shots=16, role=source) - "
             "mean(top1, method=linear_probe, shots=16, role=target)")
    v = verdict(tmp_path, check, protocol="domain_generalization")
    assert v.status == REPRODUCED
    assert v.datasets == {"role=source": ["emb_objects"], "role=target": ["emb_objects_sketch", "emb_objects_v2"]}
    assert [t.value for t in v.terms] == [40.0, 32.5, 52.0, 34.0]      # drops 7.5 < 18
    assert v.steps[0].left_value == 7.5 and v.steps[0].right_value == 18.0


def test_pinned_datasets_and_shot_curves(tmp_path):
    world(tmp_path)
    v = verdict(tmp_path, "mean(top1, method=linear_probe, shots=16, dataset=[emb_scenes]) == 58")
    assert v.holds and v.terms[0].datasets == ["emb_scenes"]
    assert v.status == INCONCLUSIVE                         # seeds 57, 58, 59: 58 exactly is inside the noise
    v = verdict(tmp_path, "mean(top1, method=linear_probe, shots=16, dataset=emb_missing) > 0")
    assert v.status == NOT_TESTABLE and "emb_missing" in v.reason
    v = verdict(tmp_path, "increasing(per(top1, method=linear_probe, by=shots))")
    assert v.status == REPRODUCED and v.terms[0].value == {1: 30.0, 2: 34.0, 4: 38.0, 8: 42.0, 16: 58.0}


def test_shot_vectors_compare_per_shot_count(tmp_path):
    world(tmp_path)
    v = verdict(tmp_path, "all(per(top1, method=coop, variant=m16, by=shots) > per(top1, method=linear_probe, by=shots) + 4.9)")
    assert v.status == REPRODUCED                           # coop = probe + 5 at every shot count
    v = verdict(tmp_path, "argmax(per(top1, method=coop, variant=m16, by=shots)) == 16 and "
                          "count(per(top1, method=linear_probe, by=shots) < mean(top1, method=zeroshot_clip, "
                          "variant=single, protocol=zeroshot)) == 4")
    assert v.status == REPRODUCED                           # probe below zero-shot (50) at 1, 2, 4, 8 shots


def test_duplicate_runs_prefer_the_methods_own_folder(tmp_path):
    rec(tmp_path, "zeroshot_clip", "d", {"top1": 50.0}, protocol="zeroshot", seed=0)
    rec(tmp_path, "zeroshot_clip", "d", {"top1": 10.0}, protocol="zeroshot", seed=0, paper="coop")
    v = verdict(tmp_path, "mean(top1, method=zeroshot_clip) == 50", protocol="zeroshot")
    assert v.status == REPRODUCED
    assert any("used papers/zeroshot_clip, ignored papers/coop" in n for n in v.notes)


@pytest.mark.parametrize("slug, expected", [
    ("zeroshot_clip", [REPRODUCED, NOT_TESTABLE, REPRODUCED, REPRODUCED]),
    ("linear_probe", [REPRODUCED, REPRODUCED, REPRODUCED, INCONCLUSIVE]),
])
def test_baseline_claims_on_a_hand_made_world(tmp_path, slug, expected):
    # world(): LP-16 58 > ZS 50; LP-1 30 < 50; LP curve increasing; ensemble 52 > single 50; ZS drop 7.5 < LP
    # drop 18. "above chance" is untestable (near-chance datasets are left out, so it could not fail). LP
    # targets 34.0 > ZS targets 32.5 on average but 28 < 30 on -sketch: resampling the two targets keeps the
    # "worse under shift" claim inside the noise (inconclusive).
    world(tmp_path)
    p = load_paper(REPO / "papers" / slug)
    got = [v.status for v in evaluate_paper(p, load_records(tmp_path), "embedded")]
    assert got == expected
    assert all(v.status == NOT_TESTABLE for v in evaluate_paper(p, load_records(tmp_path), "real"))


def test_dataset_list_keeps_the_judged_profiles_world(tmp_path):
    # one check names the embedded stand-in and the real set; each profile judges on its own world's names
    for s in (1, 2):
        rec(tmp_path, "a", "emb_satellite", {"top1": 60.0}, shots=1, seed=s)
        rec(tmp_path, "b", "emb_satellite", {"top1": 50.0}, shots=1, seed=s)
        rec(tmp_path, "a", "eurosat", {"top1": 40.0}, shots=1, profile="real", backbone="RN50", seed=s)
        rec(tmp_path, "b", "eurosat", {"top1": 45.0}, shots=1, profile="real", backbone="RN50", seed=s)
    check = "mean(top1, method=a, shots=1, dataset=[emb_satellite, eurosat]) > mean(top1, method=b, shots=1, dataset=[emb_satellite, eurosat])"
    v = verdict(tmp_path, check)
    assert v.status == REPRODUCED and [t.value for t in v.terms] == [60.0, 50.0]
    assert verdict(tmp_path, check, profile="real").status == NOT_REPRODUCED
    # a list naming only the other world's sets stays as written, so the reason names them
    v = verdict(tmp_path, "mean(top1, method=a, shots=1, dataset=[eurosat]) > 0")
    assert v.status == NOT_TESTABLE and "eurosat" in v.reason

"""Classification by description: the official sentence rules, mean-descriptor scoring, explanations that add up,
editing, the controls, and train/eval/reproduce/plot on a toy set (and on the authors' files when present)."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import papers.vcd.__main__ as vcd
from common.clip import load_clip, save_clip_checkpoint
from common.data import build_dataset
from common.engine import load_records
from papers.vcd.method import (class_sentences, classname_texts, descriptor_head, variant_sentences,
                               which_clause)
from tests.data.test_descriptors import SHARED, needs_shared
from tests.fixtures import real_layouts as rl
from tests.fixtures.toy import TOY_CLASSES
from tests.papers.helpers import toy_overrides

DESCRIPTORS = {"red square": ["four equal sides", "a red colour"], "green circle": ["a round outline"],
               "blue triangle": ["three corners", "has a pointed top", "a blue colour"],
               "yellow star": ["five points", "often yellow"]}


def enc(bundle, texts):
    return F.normalize(bundle.model.encode_text(bundle.tokenizer(texts)), dim=-1)


def test_which_clause_follows_the_official_rules():
    assert which_clause("a long, slender body") == "which is a long, slender body"
    assert which_clause("an oval body") == "which is an oval body"
    assert which_clause("antennae") == "which is antennae"               # the released rule fires on any "a..."
    assert which_clause("has four legs") == "which has four legs"
    for w in ("often", "typically", "may", "can"):
        assert which_clause(f"{w} green") == f"which {w} green"
    assert which_clause("used for cutting") == "which is used for cutting"
    assert which_clause("Antennae") == "which has Antennae"              # case-sensitive, as released
    assert which_clause("fins") == "which has fins"
    assert which_clause("a fin", "which_has") == "which has a fin"
    with pytest.raises(ValueError):
        which_clause("fins", "other")


def test_class_sentences_prepend_the_name_and_keep_empty_lists():
    assert class_sentences("tench", ["a freshwater fish", "fins"], end=".") == \
        ["tench, which is a freshwater fish.", "tench, which has fins."]
    assert class_sentences("great_white shark", ["fins"]) == ["great white shark, which has fins"]
    assert class_sentences("oysters", []) == ["oysters, which has "]   # the official [""] fallback
    assert class_sentences("tench", ["fins"], with_name=False) == ["which has fins"]
    assert classname_texts(["tench", "sea_lion"], ".") == [["tench."], ["sea lion."]]


def test_variants_move_only_what_they_say():
    names, descs = ["a", "b", "c"], [["x1", "x2"], ["y"], ["z"]]
    sents, used = variant_sentences("vcd", names, descs)
    assert sents[0] == ["a, which has x1", "a, which has x2"] and used == descs
    sents, used = variant_sentences("shuffled", names, descs, seed=0)
    assert all(s.startswith(f"{n}, ") for n, ss in zip(names, sents) for s in ss)   # names kept
    assert sorted(map(tuple, used)) == sorted(map(tuple, descs)) and all(u != d for u, d in zip(used, descs))
    sents, _ = variant_sentences("no_name", names, descs)
    assert sents[1] == ["which has y"]
    with pytest.raises(ValueError, match="unknown VCD variant"):
        variant_sentences("best", names, descs)


def test_score_is_the_mean_cosine_over_the_class_descriptors(tiny_rn):
    sents = [["cat, which has whiskers", "cat, which is a pet", "cat, which has fur"], ["dog, which has a tail"]]
    head = descriptor_head(tiny_rn, sents)
    x = torch.randn(5, tiny_rn.embed_dim)
    xn = F.normalize(x, dim=-1)
    expected = torch.stack([(xn @ enc(tiny_rn, s).T).mean(1) for s in sents], dim=1)
    assert torch.allclose(head.scores(x), expected, atol=1e-6)
    per = head.descriptor_scores(x)                      # the explanation: its class means are the scores
    assert torch.allclose(torch.stack([per[:, :3].mean(1), per[:, 3]], 1), head.scores(x), atol=1e-6)
    # the class means are not renormalised: unlike CuPL, a class of agreeing sentences scores higher
    assert not torch.allclose(head.class_means.norm(dim=-1), torch.ones(2))


def test_editing_one_class_changes_only_its_score(tiny_rn):
    sents = [["cat, which has whiskers"], ["dog, which has a tail"], ["cow, which has horns"]]
    edited = [sents[0], sents[1] + ["dog, which has floppy ears"], sents[2]]
    x = torch.randn(4, tiny_rn.embed_dim)
    a, b = descriptor_head(tiny_rn, sents).scores(x), descriptor_head(tiny_rn, edited).scores(x)
    assert torch.allclose(a[:, [0, 2]], b[:, [0, 2]], atol=1e-6) and not torch.allclose(a[:, 1], b[:, 1], atol=1e-4)


def _args(tmp_path, bundle, descriptors=DESCRIPTORS, **extra):
    f = tmp_path / "vcd_toy.json"
    f.write_text(json.dumps(descriptors))
    sets = {"descriptors": str(f), "backbones": "[]", "shots": None, "seeds": None, "xd_source": None,
            "explain.datasets": "[toy]", "figure_dir": str(tmp_path / "figs")}
    sets.update(extra)
    return toy_overrides(tmp_path, bundle, sets)


def test_eval_records_equal_hand_computed_accuracy(tmp_path, tiny_rn):
    vcd.main(["eval", *_args(tmp_path, tiny_rn)])
    recs = {(r["protocol"], r["dataset"], r["method"], r["variant"]): r for r in load_records(paper="vcd")}
    zs = {(m, v) for p, d, m, v in recs if p == "zeroshot"}
    assert zs == {("vcd", v) for v in ("vcd", "which_has", "no_name", "shuffled")} | {("clip_classname", "")}
    assert {(d, m, v) for p, d, m, v in recs if p == "domain_generalization"} == \
        {(d, m, v) for d in ("toy", "toy_shift") for m, v in (("vcd", "vcd"), ("clip_classname", ""))}
    bundle = load_clip("tiny-rn", tmp_path / "tiny-rn.pt")
    ds = build_dataset("toy", tmp_path / "data")
    images = torch.stack([bundle.preprocess_val(Image.open(d.impath).convert("RGB")) for d in ds.test])
    f = F.normalize(bundle.model.encode_image(images), dim=-1)
    labels = torch.tensor([d.label for d in ds.test])
    scores = torch.stack([(f @ enc(bundle, class_sentences(c, DESCRIPTORS[c])).T).mean(1) for c in ds.classnames], 1)
    expected = scores.argmax(-1).eq(labels).float().mean().item() * 100
    assert recs[("zeroshot", "toy", "vcd", "vcd")]["metrics"]["top1"] == pytest.approx(expected, abs=1e-3)
    base = enc(bundle, list(ds.classnames))
    expected = (f @ base.T).argmax(-1).eq(labels).float().mean().item() * 100
    rec = recs[("zeroshot", "toy", "clip_classname", "")]
    assert rec["metrics"]["top1"] == pytest.approx(expected, abs=1e-3) and rec["texts"]["example"] == "red square"
    assert recs[("zeroshot", "toy", "vcd", "vcd")]["texts"]["example"] == "red square, which has four equal sides"


def test_reproduce_explains_and_plots(tmp_path, tiny_rn, capsys):
    args = _args(tmp_path, tiny_rn)
    vcd.main(["train", *args])
    assert load_records(paper="vcd") == []
    vcd.main(["reproduce", *args])
    data = json.loads(vcd.explain_path("embedded", "tiny-rn").read_text())
    assert data["images"] and len(data["images"]) <= 2
    for im in data["images"]:
        pred, other = im["classes"]
        assert pred["role"] == "predicted" and other["role"] in ("true", "runner-up")
        assert pred["class"] == im["predicted"] and pred["score"] >= other["score"]
        for c in im["classes"]:     # the class score is exactly the mean of its explained descriptor scores
            assert c["score"] == pytest.approx(sum(d["score"] for d in c["descriptors"]) / len(c["descriptors"]),
                                               abs=1e-2)
            assert sorted(d["descriptor"] for d in c["descriptors"]) == sorted(DESCRIPTORS[c["class"]])
    n = len(load_records(paper="vcd"))
    vcd.main(["reproduce", *args])
    assert len(load_records(paper="vcd")) == n and "existing record" in capsys.readouterr().out
    vcd.main(["plot", *args])
    assert (tmp_path / "figs" / "explanations_embedded_tiny-rn.png").stat().st_size > 5000


def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_rn, capsys):
    def fails(args, *needles):
        with pytest.raises(SystemExit) as e:
            vcd.main(["eval", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        for n in needles:
            assert n in err, err
        assert load_records(paper="vcd") == []
    fails(_args(tmp_path, tiny_rn, descriptors={"red square": ["x"]}), "lacks 3 of the 4 classes")
    (tmp_path / "broken.json").write_text('{"red square": ["x"')
    fails(_args(tmp_path, tiny_rn, descriptors=None) + ["--set", f"descriptors={tmp_path / 'broken.json'}"],
          "not valid JSON")
    fails(_args(tmp_path, tiny_rn, descriptors={**DESCRIPTORS, "green circle": []}, empty_descriptors="error"),
          "empty list", "green circle")
    fails(_args(tmp_path, tiny_rn, phrasing="sometimes"), "phrasing must be one of")
    fails(_args(tmp_path, tiny_rn, variants="[vcd, max]"), "unknown ['max']")
    fails(_args(tmp_path, tiny_rn, **{"explain.top": 0}), "explain.top must be an integer >= 1")
    fails(_args(tmp_path, tiny_rn, aliases="{toy: {dog: cat}}"), "unknown class(es) ['dog']")


def test_empty_lists_use_the_official_fallback_and_extra_keys_are_reported(tmp_path, tiny_rn):
    descriptors = {**DESCRIPTORS, "green circle": [], "purple hexagon": ["six sides"]}   # an authors' file may
    vcd.main(["eval", *_args(tmp_path, tiny_rn, descriptors=descriptors, variants="[vcd]", dg_targets="[]")])
    rec = next(r for r in load_records(paper="vcd", method="vcd"))                    # hold extra classes
    assert rec["texts"]["empty_lists"] == ["green circle"] and rec["texts"]["unused_keys"] == ["purple hexagon"]


@needs_shared
def test_real_profile_reads_the_authors_files(tmp_path, tiny_rn):
    """The released VCD files (DTD, EuroSAT with its renamed classes, ImageNet and ImageNetV2 with the final
    "." and CLIP's repeated names) through the real loaders' fixture trees."""
    root = tmp_path / "DATA"
    for make in (rl.make_dtd, rl.make_eurosat, rl.make_imagenet, rl.make_imagenetv2):
        make(root)
    ckpt = save_clip_checkpoint(tiny_rn.model, tmp_path / "rn.pt")
    sets = {"arch": "tiny-rn", "pretrained": str(ckpt), "data_root": str(root), "descriptors": str(SHARED / "vcd"),
            "datasets": "[dtd, eurosat]", "variants": "[vcd]", "figure_dir": str(tmp_path / "figs")}
    vcd.main(["reproduce", "--profile", "real", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    recs = {(r["protocol"], r["dataset"], r["method"]): r for r in load_records(paper="vcd", profile="real")}
    assert recs[("zeroshot", "eurosat", "vcd")]["metrics"]["top1"] >= 0
    assert recs[("domain_generalization", "imagenetv2", "vcd")]["texts"]["example"] == \
        "tench, which is a freshwater fish."
    assert recs[("domain_generalization", "imagenet", "clip_classname")]["texts"]["example"] == "tench."
    assert vcd.explain_path("real", "tiny-rn").is_file()

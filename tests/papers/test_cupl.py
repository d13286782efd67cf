"""CuPL: the pooled sentence classifier, the CuPL + e rule, the controls, and train/eval/reproduce on a toy set."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import papers.cupl.__main__ as cupl
from common.clip import load_clip, zeroshot_classifier
from common.data import build_dataset
from common.engine import load_records
from papers.cupl.method import cupl_weights, rename, shuffled, subset, variant_texts, with_templates
from common.clip import save_clip_checkpoint
from tests.data.test_descriptors import SHARED, needs_shared
from tests.fixtures import real_layouts as rl
from tests.fixtures.toy import TOY_CLASSES
from tests.papers.helpers import toy_overrides

SENTENCES = {c: [f"A {c} is a shape.", f"You can recognise a {c} by its colour.", f"A {c} on a plain background."]
             for c in TOY_CLASSES}
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def enc(bundle, texts):
    return F.normalize(bundle.model.encode_text(bundle.tokenizer(texts)), dim=-1)


def test_classifier_is_renormalised_mean_of_normalised_sentence_embeddings(tiny_rn):
    texts = [["a cat sleeps.", "cats have whiskers.", "a small furry animal."], ["a dog barks."]]
    w = cupl_weights(tiny_rn, texts)
    expected = torch.stack([F.normalize(enc(tiny_rn, t).mean(0), dim=-1) for t in texts])
    assert torch.allclose(w, expected, atol=1e-6)


def test_cupl_e_pools_templates_and_sentences_with_equal_weight(tiny_rn):
    names = ["cat", "dog"]
    sents = [["cats have whiskers."], ["a dog barks.", "dogs wag their tails."]]
    texts = with_templates(sents, names, TEMPLATES)
    assert texts[0] == ["a photo of a cat.", "a drawing of a cat.", "cats have whiskers."]
    w = cupl_weights(tiny_rn, texts)
    for c, (name, s) in enumerate(zip(names, sents)):
        total = enc(tiny_rn, [t.format(name) for t in TEMPLATES]).sum(0) + enc(tiny_rn, s).sum(0)
        assert torch.allclose(w[c], F.normalize(total, dim=-1), atol=1e-6)
    # no sentences at all: CuPL + e is exactly the template ensemble of zero-shot CLIP
    only = cupl_weights(tiny_rn, with_templates([[], []], names, TEMPLATES))
    assert torch.allclose(only, zeroshot_classifier(tiny_rn, names, TEMPLATES, cache_dir=None), atol=1e-5)


def test_shuffled_control_moves_descriptions_and_swaps_the_name_in():
    names = ["star", "cat", "dog"]
    texts = [["A star has five points.", "A starfish is not a star."], ["A cat has whiskers."], ["A Dog barks."]]
    out = shuffled(texts, names, seed=0)
    for i, lst in enumerate(out):
        donor = next(j for j, t in enumerate(texts) if len(t) == len(lst) and
                     [rename(x, names[j], names[i]) for x in t] == lst)
        assert donor != i
    assert rename("A starfish is not a star.", "star", "dog") == "A starfish is not a dog."   # whole words only
    assert rename("A Dog barks.", "dog", "cat") == "A cat barks."                             # case-insensitive
    assert shuffled(texts, names, 0) == shuffled(texts, names, 0)


def test_sentence_subsets():
    texts = [[f"s{i}" for i in range(10)], ["only"]]
    out = subset(texts, 3, seed=0)
    assert len(out[0]) == 3 and set(out[0]) <= set(texts[0]) and out[1] == ["only"]
    assert out == subset(texts, 3, seed=0) and variant_texts("n3", texts, ["a", "b"], TEMPLATES) == out
    with pytest.raises(ValueError, match="unknown CuPL variant"):
        variant_texts("best", texts, ["a", "b"], TEMPLATES)


def _args(tmp_path, bundle, sentences=SENTENCES, **extra):
    f = tmp_path / "cupl_toy.json"
    f.write_text(json.dumps(sentences))
    sets = {"descriptors": str(f), "backbones": "[]", "shots": None, "seeds": None, "xd_source": None,
            "sentence_counts": "[2]"}
    sets.update(extra)
    return toy_overrides(tmp_path, bundle, sets)


def test_eval_records_equal_hand_computed_accuracy(tmp_path, tiny_rn):
    cupl.main(["eval", *_args(tmp_path, tiny_rn)])
    recs = {(r["protocol"], r["dataset"], r["variant"]): r for r in load_records(paper="cupl")}
    assert {k[2] for k in recs} == {"cupl", "cupl_e", "shuffled", "n2"}
    assert {(p, d) for p, d, _ in recs} == {("zeroshot", "toy"), ("domain_generalization", "toy"),
                                             ("domain_generalization", "toy_shift")}
    bundle = load_clip("tiny-rn", tmp_path / "tiny-rn.pt")
    ds = build_dataset("toy", tmp_path / "data")
    images = torch.stack([bundle.preprocess_val(Image.open(d.impath).convert("RGB")) for d in ds.test])
    f = F.normalize(bundle.model.encode_image(images), dim=-1)
    w = torch.stack([F.normalize(enc(bundle, SENTENCES[c]).mean(0), dim=-1) for c in ds.classnames])
    expected = (f @ w.T).argmax(-1).eq(torch.tensor([d.label for d in ds.test])).float().mean().item() * 100
    rec = recs[("zeroshot", "toy", "cupl")]
    assert rec["metrics"]["top1"] == pytest.approx(expected, abs=1e-3)
    assert rec["shots"] is None and rec["seed"] == 0 and rec["texts"]["per_class_mean"] == 3
    assert recs[("zeroshot", "toy", "cupl_e")]["texts"]["per_class_mean"] == 3 + 3   # toy: 3 ensemble templates


def test_train_and_reproduce_smoke_and_resume(tmp_path, tiny_rn, capsys):
    args = _args(tmp_path, tiny_rn)
    cupl.main(["train", *args])
    assert load_records(paper="cupl") == []                      # train builds classifiers, writes no record
    cupl.main(["reproduce", *args])
    n = len(load_records(paper="cupl"))
    assert n == 4 + 2 * 2
    cupl.main(["reproduce", *args])                              # finished runs are skipped
    assert len(load_records(paper="cupl")) == n and "existing record" in capsys.readouterr().out


def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_rn, capsys):
    def fails(args, *needles):
        with pytest.raises(SystemExit) as e:
            cupl.main(["eval", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        for n in needles:
            assert n in err, err
        assert load_records(paper="cupl") == []
    fails(_args(tmp_path, tiny_rn, descriptors=str(tmp_path / "none.json")), "does not exist")
    missing = {c: s for c, s in SENTENCES.items() if c != "yellow star"}
    fails(_args(tmp_path, tiny_rn, sentences=missing), "lacks 1 of the 4 classes", "'yellow star'")
    fails(_args(tmp_path, tiny_rn, sentences={**SENTENCES, "red square": []}), "empty list", "red square")
    fails(_args(tmp_path, tiny_rn, variants="[cupl, best]"), "variants: unknown ['best']")
    fails(_args(tmp_path, tiny_rn, sentence_counts="[0]"), "sentence_counts must be integers >= 1")
    fails(_args(tmp_path, tiny_rn, backbones="[tiny-vit=/no/such.pt]"), "backbones:", "does not exist")
    fails(_args(tmp_path, tiny_rn, descriptors="auto"), "ships no cupl descriptor file")
    with pytest.raises(SystemExit):
        cupl.main(["eval", *toy_overrides(tmp_path, tiny_rn, {"shots": "[1]", "seeds": None, "xd_source": None})])
    assert "does not use 'shots'" in capsys.readouterr().err


def test_real_profile_needs_the_authors_files(capsys, tmp_path):
    from tests.fixtures.real_layouts import make_dtd
    root = make_dtd(tmp_path / "DATA")   # data and weights found: the missing descriptor files are the problem
    with pytest.raises(SystemExit) as e:
        cupl.main(["eval", "--profile", "real", "--set", "pretrained=random", "--set", "arch=tiny-rn",
                   "--set", "datasets=[dtd]", "--set", f"data_root={root}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs the authors' cupl files: --set descriptors=" in err


@needs_shared
def test_real_profile_reads_the_authors_files(tmp_path, tiny_rn):
    """The released CuPL files (DTD, Oxford Pets) through the real loaders' fixture trees, matched by name."""
    root = tmp_path / "DATA"
    rl.make_dtd(root)
    rl.make_oxford_pets(root)
    ckpt = save_clip_checkpoint(tiny_rn.model, tmp_path / "rn.pt")
    sets = {"arch": "tiny-rn", "pretrained": str(ckpt), "data_root": str(root), "datasets": "[dtd, oxford_pets]",
            "descriptors": str(SHARED / "cupl"), "variants": "[cupl]"}
    cupl.main(["reproduce", "--profile", "real", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    recs = load_records(paper="cupl", profile="real")
    assert {(r["dataset"], r["variant"]) for r in recs} == {("dtd", "cupl"), ("oxford_pets", "cupl")}
    pets = next(r for r in recs if r["dataset"] == "oxford_pets" and r["variant"] == "cupl")
    assert pets["texts"]["per_class_mean"] == 20 and len(pets["texts"]["unused_keys"]) == 33


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cupl.main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "descriptors" in out and "sentence_counts" in out and "backbones" in out


def test_standard_templates_are_zero_shot_clips_ensemble(tmp_path, tiny_rn):
    from papers.zeroshot_clip.method import templates_for
    toy_overrides(tmp_path, tiny_rn)
    ds = build_dataset("toy", tmp_path / "data")
    assert cupl.standard_templates(ds) == templates_for(ds, "ensemble")
    ds.meta.pop("templates")
    assert cupl.standard_templates(ds) == templates_for(ds, "ensemble") and len(cupl.standard_templates(ds)) == 80

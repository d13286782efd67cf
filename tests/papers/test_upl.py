from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import papers.upl.__main__ as upl_main
from common.clip import logit_scale, save_clip_checkpoint
from common.data import Datum, build_dataset
from common.engine import load_records
from common.engine.cache import cached_features
from common.engine.protocols import Task
from papers.coop.method import PromptLearner, coop_logits, load_learner, train_coop_many
from papers.upl.method import (POOL_SPLIT, ensemble_weights, member_seeds, pool_logits, pseudo_dataset, pseudo_label,
                               pseudo_label_quality, select_top_k, unlabeled_pool)
from tests.fixtures.toy import write_toy
from tests.papers.helpers import toy_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_top_k_per_class_by_hand():
    # 7 images, 3 classes. argmax: img0..2 -> class 0, img3 -> class 1, img4 -> class 0, img5,6 -> class 1.
    logits = torch.tensor([[5.0, 1.0, 0.0],    # 0: class 0, conf 5
                           [3.0, 2.0, 0.0],    # 1: class 0, conf 3
                           [9.0, 0.0, 0.0],    # 2: class 0, conf 9
                           [0.0, 4.0, 1.0],    # 3: class 1, conf 4
                           [4.0, 0.0, 3.9],    # 4: class 0, conf 4
                           [0.0, 7.0, 6.0],    # 5: class 1, conf 7
                           [1.0, 2.0, 1.5]])   # 6: class 1, conf 2
    idx, lab = select_top_k(logits, k=2)
    # class 0 keeps its 2 most confident (img2: 9, img0: 5), class 1 (img5: 7, img3: 4); class 2 has no candidate
    assert idx.tolist() == [2, 0, 5, 3] and lab.tolist() == [0, 0, 1, 1]
    idx, lab = select_top_k(logits, k=3)        # class 0: 2, 0, 4 (9, 5, 4); class 1: its 3 candidates
    assert idx.tolist() == [2, 0, 4, 5, 3, 6] and lab.tolist() == [0, 0, 0, 1, 1, 1]
    idx, lab = select_top_k(logits, k=10)       # fewer candidates than K: every image kept once, under its argmax
    assert sorted(idx.tolist()) == list(range(7)) and lab.tolist() == [0, 0, 0, 0, 1, 1, 1]
    # by probability the order can differ from the raw logit: img5 (7 vs 6) is less sure than img3 (4 vs 1)
    idx, _ = select_top_k(logits, k=1, rank_by="prob")
    p = logits.softmax(-1)
    assert p[3].max() > p[5].max() and idx.tolist() == [2, 3]
    with pytest.raises(ValueError, match="rank_by"):
        select_top_k(logits, 2, rank_by="entropy")
    with pytest.raises(ValueError, match=">= 1"):
        select_top_k(logits, 0)


def test_top_k_invariants_on_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(200, 7) + torch.tensor([2.0, 0, 0, 0, 0, 0, -3.0])   # biased towards class 0, against 6
    idx, lab = select_top_k(logits, k=5)
    assert len(set(idx.tolist())) == len(idx)                         # each image at most once
    assert torch.equal(lab, logits[idx].argmax(-1))                   # only under its own argmax class
    pred = logits.argmax(-1)
    for c in range(7):
        n_c = int((pred == c).sum())
        chosen = idx[lab == c]
        assert len(chosen) == min(5, n_c)
        if n_c > len(chosen):   # the kept ones are the most confident of the class
            left = [i for i in torch.nonzero(pred == c).flatten().tolist() if i not in chosen.tolist()]
            assert logits[chosen, c].min() >= logits[left, c].max()


def test_ensemble_is_the_mean_of_text_features_and_of_logits():
    torch.manual_seed(1)
    ws = [F.normalize(torch.randn(4, 8), dim=-1) for _ in range(3)]
    ens = ensemble_weights(ws)
    assert torch.allclose(ens, (ws[0] + ws[1] + ws[2]) / 3)
    feats = torch.randn(6, 8)
    mean_logits = torch.stack([coop_logits(feats, w, 100.0) for w in ws]).mean(0)
    assert torch.allclose(coop_logits(feats, ens, 100.0), mean_logits, atol=1e-4)
    # a renormalised mean would not give the official logit average
    assert not torch.allclose(coop_logits(feats, F.normalize(ens, dim=-1), 100.0), mean_logits, atol=1e-2)
    assert torch.equal(ensemble_weights(ws[:1]), ws[0])
    with pytest.raises(ValueError):
        ensemble_weights([])
    with pytest.raises(ValueError, match="shape"):
        ensemble_weights([ws[0], ws[1][:3]])


def test_member_seeds():
    assert member_seeds(1, 16) == list(range(1, 17))       # the official seeds 1..16
    assert member_seeds(2, 4) == [5, 6, 7, 8] and member_seeds(3, 1) == [3]


def _toy(tmp_path):
    write_toy(tmp_path / "data", "toy")
    return build_dataset("toy", tmp_path / "data")


def test_photo_init_prompt_gives_the_pseudo_labelling_logits(tmp_path, tiny_clip):
    ds = _toy(tmp_path)
    pool = unlabeled_pool(ds)
    assert all(d.label == -1 and d.classname == "" for d in pool) and len(pool) == len(ds.train)
    logits = pool_logits([tiny_clip], ds, pool)                       # template "a photo of a {}."
    learner = PromptLearner(tiny_clip, ds.classnames, ctx_init="a photo of a")
    feats = cached_features(tiny_clip, ds.name, POOL_SPLIT, pool)["features"]
    with torch.no_grad():
        ours = coop_logits(feats, learner.class_embeddings(), logit_scale(tiny_clip))
    assert torch.allclose(ours, logits, atol=1e-3)
    # UPL* averages the models' logits
    two = pool_logits([tiny_clip, tiny_clip], ds, pool)
    assert torch.allclose(two, logits, atol=1e-5)


def test_multi_model_logits_are_the_average(tmp_path, tiny_rn, tiny_vit):
    ds = _toy(tmp_path)
    pool = unlabeled_pool(ds)
    a, b = pool_logits([tiny_rn], ds, pool), pool_logits([tiny_vit], ds, pool)
    assert torch.allclose(pool_logits([tiny_rn, tiny_vit], ds, pool), (a + b) / 2, atol=1e-5)


def _train(ds, bundle, cfg, seeds=(1, 2)):
    pl = pseudo_label([bundle], ds, 2)
    tasks = [Task(cfg, bundle, pl.dataset, 2, s, None) for s in seeds]
    return pl, [l.ctx.detach().clone() for l in train_coop_many(tasks, cfg, out_dir=None)]


CFG = {"epochs": 3, "batch_size": 4, "threads": 1, "train": {"lr": 0.02, "warmup_epochs": 0}}


def test_no_label_is_read_in_training(tmp_path, tiny_rn):
    ds = _toy(tmp_path)
    before = {k: v.clone() for k, v in tiny_rn.model.state_dict().items()}
    pl, ctx = _train(ds, tiny_rn, CFG)
    # the training set carries the pseudo-labels, nothing else
    assert [d.label for d in pl.dataset.train] == pl.labels.tolist()
    assert [d.impath for d in pl.dataset.train] == [pl.pool[i].impath for i in pl.idx.tolist()]
    # shuffle the pool's true labels (and put them in an `unlabeled` meta too): exactly the same prompts
    perm = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [Datum(d.impath, ds.train[j].label, ds.train[j].classname) for d, j in zip(ds.train, perm)]
    assert [d.label for d in shuffled] != [d.label for d in ds.train]
    for other in (replace(ds, train=shuffled), replace(ds, train=shuffled, meta={**ds.meta, "unlabeled": shuffled})):
        pl2, ctx2 = _train(other, tiny_rn, CFG)
        assert torch.equal(pl2.idx, pl.idx) and torch.equal(pl2.labels, pl.labels)
        assert all(torch.equal(a, b) for a, b in zip(ctx, ctx2))
        assert pseudo_label_quality(other, pl2) != pseudo_label_quality(ds, pl)   # the labels did change
    assert not torch.equal(ctx[0], ctx[1])                           # the ensemble's seeds differ
    after = tiny_rn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)     # CLIP stays frozen


def test_pseudo_label_quality_by_hand(tmp_path, tiny_rn):
    ds = _toy(tmp_path)
    pl = pseudo_label([tiny_rn], ds, 2)
    truth = torch.tensor([d.label for d in ds.train])
    q = pseudo_label_quality(ds, pl)
    assert q["pseudo_acc"] == pytest.approx(float((truth[pl.idx] == pl.labels).float().mean() * 100))
    assert q["pool_acc"] == pytest.approx(float((pl.logits.argmax(-1) == truth).float().mean() * 100))
    assert q["n_pseudo"] == len(pl.idx) <= 2 * ds.num_classes
    # a hand-made selection: two images labelled with their true class, one wrong -> 2/3
    idx, lab = torch.tensor([0, 1, 2]), torch.tensor([ds.train[0].label, ds.train[1].label, (ds.train[2].label + 1) % 4])
    hand = replace(pl, idx=idx, labels=lab, dataset=pseudo_dataset(ds, pl.pool, idx, lab))
    assert pseudo_label_quality(ds, hand)["pseudo_acc"] == pytest.approx(200 / 3)


def test_reproduce_eval_and_bad_input_smoke(tmp_path, tiny_rn, tiny_vit, capsys):
    sets = toy_overrides(tmp_path, tiny_rn, {"shots": None, "epochs": 2, "batch_size": 4, "per_class": 2,
                                             "n_prompts": 2, "seeds": "[1, 2]"})
    vit = tmp_path / "tiny-vit.pt"
    save_clip_checkpoint(tiny_vit.model, vit)
    sets += ["--set", f"pseudo_models=[tiny-rn={tmp_path / 'tiny-rn.pt'},tiny-vit={vit}]"]
    upl_main.main(["reproduce", *sets])
    recs = load_records(paper="upl", protocol="unsupervised")
    assert sorted((r["variant"], r["seed"]) for r in recs) == [(v, s) for v in ("ens", "ens_ctxv1", "single", "star")
                                                                for s in (1, 2)]
    assert all(r["shots"] is None and {"top1", "pseudo_acc", "pool_acc"} <= set(r["metrics"]) for r in recs)
    assert {r["n_prompts"] for r in recs if r["variant"] == "single"} == {1}
    assert {r["n_prompts"] for r in recs if r["variant"] != "single"} == {2}
    # the init ablation's prompts start from "a photo of a" (M = 4); the others from 16 random vectors
    ckpts = tmp_path / "runs" / "upl" / "_checkpoints"
    assert {p.parent.parent.parent.name: load_learner(p, tiny_rn).n_ctx
            for p in ckpts.rglob("prompt_0.pt")} == {"upl-ens": 16, "upl-single": 16, "upl-star": 16, "upl-ens_ctxv1": 4}
    assert not list((tmp_path / "runs").rglob("checkpoint.pt"))
    evals = upl_main.main(["eval", *sets])
    stored = {(r["variant"], r["seed"]): r["metrics"]["top1"] for r in recs}
    assert len(evals) == len(recs)
    assert all(e["top1"] == pytest.approx(stored[(e["variant"], e["seed"])], abs=1e-6) for e in evals)
    for bad, why in [("n_prompts=0", "n_prompts"), ("variants=[ens,foo]", "variants"), ("rank_by=entropy", "rank_by"),
                     ("per_class=0", "per_class"), ("shots=[1]", "does not use"),
                     ("pseudo_models=[tiny-rn=/nonexistent.pt,tiny-vit=/nonexistent.pt]", "pseudo_models")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as err:
            upl_main.main(["train", *sets, "--set", bad])
        assert err.value.code == 2
        assert why in capsys.readouterr().err

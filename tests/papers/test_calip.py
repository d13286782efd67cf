import math

import pytest
import torch
import torch.nn.functional as F

import papers.calip.__main__ as calip_main
from common.clip import logit_scale, zeroshot_classifier
from common.data import build_dataset
from common.engine import cosine_logits, load_records
from common.engine.protocols import bundle_for
from common.engine.dense import attnpool_tokens, dense_features, encode_global_and_dense
from papers.calip.method import (Calip, CalipFS, beta_grid, calip_terms, cross_modal_attention, fuse, pool_mean_max,
                                 search_betas)
from tests.papers.helpers import toy_overrides


def _sig(x):  # two-way softmax weight of the first entry: e^a / (e^a + e^b) = sigmoid(a - b)
    return 1.0 / (1.0 + math.exp(-x))


def test_attention_against_a_hand_computed_example():
    """HW = 2 locations, K = 2 classes, C = 2, s = 2, worked out by hand."""
    F_s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])          # (1, HW, C)
    F_t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])            # (K, C); A = F_s F_t^T = [[1, .6], [0, .8]]
    F_s_a, F_t_a = cross_modal_attention(F_s, F_t, scale=2.0)
    w = _sig(2 * (1 - 0.6))      # location 0 over classes: softmax(2, 1.2)
    u = _sig(2 * (0 - 0.8))      # location 1 over classes: softmax(0, 1.6)
    expect_s = [[w + 0.6 * (1 - w), 0.8 * (1 - w)], [u + 0.6 * (1 - u), 0.8 * (1 - u)]]
    p = _sig(2 * (1 - 0))        # class 0 over locations: softmax(2, 0)
    q = _sig(2 * (0.6 - 0.8))    # class 1 over locations: softmax(1.2, 1.6)
    expect_t = [[p, 1 - p], [q, 1 - q]]
    assert torch.allclose(F_s_a[0], torch.tensor(expect_s), atol=1e-6)
    assert torch.allclose(F_t_a[0], torch.tensor(expect_t), atol=1e-6)
    # pooled text-aware visual feature: mean + max over locations, per channel
    pooled = [(a + b) / 2 + max(a, b) for a, b in zip(expect_s[0], expect_s[1])]
    assert torch.allclose(pool_mean_max(F_s_a)[0], torch.tensor(pooled), atol=1e-6)
    # the three logit terms with f_v = (0.8, 0.6) and logit scale 100
    f_v = torch.tensor([[0.8, 0.6]])
    t = calip_terms(f_v, F_s, F_t, logit_scale=100.0, scale=2.0)
    assert torch.allclose(t.zero_shot, torch.tensor([[80.0, 96.0]]), atol=1e-4)
    vt = [100 * (0.8 * r[0] + 0.6 * r[1]) for r in expect_t]
    tv = [100 * (pooled[0] * c[0] + pooled[1] * c[1]) for c in F_t.tolist()]
    assert torch.allclose(t.visual_text, torch.tensor([vt]), atol=1e-4)
    assert torch.allclose(t.text_visual, torch.tensor([tv]), atol=1e-4)
    assert torch.allclose(fuse(t, 0.5, 0.1), t.zero_shot + 0.5 * t.visual_text + 0.1 * t.text_visual)
    # the softmax-axis ablation weights the text side over classes instead of locations
    _, wrong = cross_modal_attention(F_s, F_t, scale=2.0, text_softmax="classes")
    assert not torch.allclose(wrong, F_t_a)
    with pytest.raises(ValueError, match="text_softmax"):
        cross_modal_attention(F_s, F_t, text_softmax="rows")


def test_chunking_does_not_change_the_terms():
    g = torch.Generator().manual_seed(0)
    f_v, F_s, F_t = torch.randn(7, 16, generator=g), torch.randn(7, 5, 16, generator=g), torch.randn(3, 16, generator=g)
    full = calip_terms(f_v, F_s, F_t, 50.0)
    tiny = calip_terms(f_v, F_s, F_t, 50.0, max_elements=1)  # one image per chunk
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(full, tiny))


def test_dense_tokens_come_from_the_final_pool_on_every_location(tiny_clip):
    model = tiny_clip.model.eval()
    x = torch.randn(2, 3, tiny_clip.image_size, tiny_clip.image_size)
    with torch.no_grad():
        tokens = encode_global_and_dense(model, x, "attnpool")
        value = encode_global_and_dense(model, x, "value")
        g = model.encode_image(x)
    assert torch.equal(tokens[:, 0], g) and torch.equal(value[:, 0], g)
    side = tiny_clip.image_size // (32 if tiny_clip.arch == "tiny-rn" else 8)
    assert tokens.shape == (2, 1 + side * side, tiny_clip.embed_dim)
    if tiny_clip.arch == "tiny-rn":  # full self-attention outputs, not MaskCLIP's value path
        assert not torch.allclose(tokens[:, 1:], value[:, 1:], atol=1e-4)
        with pytest.raises(ValueError, match="positions"):
            attnpool_tokens(model.visual.attnpool, torch.randn(1, model.visual.attnpool.k_proj.in_features, 3, 3))
    else:  # ViT: ln_post + proj on the patch tokens in both modes
        assert torch.equal(tokens, value)


def test_beta2_beta3_zero_is_zero_shot_clip_exactly(tiny_clip):
    model = tiny_clip.model.eval()
    x = torch.randn(6, 3, tiny_clip.image_size, tiny_clip.image_size)
    F_t = zeroshot_classifier(tiny_clip, ["red square", "blue circle", "green star"], ["a photo of a {}."],
                              cache_dir=None)
    with torch.no_grad():
        feats = encode_global_and_dense(model, x, "attnpool")
        zs = cosine_logits(model.encode_image(x), F_t, logit_scale(tiny_clip))
    calip = Calip(F_t, beta2=0.0, beta3=0.0, logit_scale=logit_scale(tiny_clip))
    out = calip(feats[:, 0], feats[:, 1:])
    assert torch.allclose(out, zs, atol=1e-5) and torch.equal(out.argmax(-1), zs.argmax(-1))
    # and the other terms do change the logits
    assert not torch.allclose(Calip(F_t, 1.0, 0.1, logit_scale(tiny_clip))(feats[:, 0], feats[:, 1:]), zs, atol=1e-3)


def test_calip_is_parameter_free_and_deterministic():
    F_t = torch.randn(4, 8)
    calip = Calip(F_t, 1.0, 0.1, 100.0)
    assert list(calip.parameters()) == [] and sum(p.numel() for p in calip.parameters()) == 0
    f_v, F_s = torch.randn(3, 8), torch.randn(3, 5, 8)
    assert torch.equal(calip(f_v, F_s), calip(f_v, F_s))


def test_calip_fs_starts_at_calip_and_trains_only_its_projections(tiny_rn):
    model = tiny_rn.model.eval()
    F_t = zeroshot_classifier(tiny_rn, ["a", "b", "c"], ["a photo of a {}."], cache_dir=None)
    with torch.no_grad():  # as the feature cache does
        feats = encode_global_and_dense(model, torch.randn(4, 3, 64, 64), "attnpool")
    f_v, F_s = feats[:, 0], feats[:, 1:]
    fs = CalipFS(F_t, 1.2, 0.05, 100.0)
    ref = Calip(F_t, 1.2, 0.05, 100.0)(f_v, F_s)
    assert torch.allclose(fs(f_v, F_s), ref, atol=1e-4)
    trainable = sorted(n for n, p in fs.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{m}.{w}" for m in "qkvo" for w in ("weight", "bias"))
    F.cross_entropy(fs(f_v, F_s), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fs.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not fs.text_features.requires_grad
    # after a step the projections are no longer the identity and the logits move away from CALIP
    with torch.no_grad():
        for p in fs.parameters():
            p -= 0.1 * p.grad
    assert not torch.allclose(fs(f_v, F_s), ref, atol=1e-3)


def test_beta_search_grid_and_tie_rule():
    grid = beta_grid(2.0, 200)
    assert len(grid) == 200 and grid[0] == pytest.approx(0.001) and grid[-1] < 2.0
    assert grid[1] - grid[0] == pytest.approx(1.999 / 200)
    # 4 samples, 2 classes: the zero-shot term is wrong on samples 2 and 3, the visual-text term fixes
    # sample 2 once beta2 > 1 and sample 3 once beta2 > 3; the text-visual term only hurts
    zs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    vt = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    tv = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    from papers.calip.method import Terms
    labels = torch.tensor([0, 0, 0, 0])
    b2, b3, acc = search_betas(Terms(zs, vt, tv), labels, [0.5, 1.5, 2.5, 3.5, 4.5], [0.0, 0.5])
    assert (b2, b3, acc) == (3.5, 0.0, 100.0)  # first grid point that fixes both, smallest beta3
    b2, b3, acc = search_betas(Terms(zs, vt, tv), labels, [0.5, 1.5, 2.5], [0.0, 0.5])
    assert (b2, b3, acc) == (1.5, 0.0, 75.0)   # 1.5 and 2.5 tie at 75%: the smaller wins
    with pytest.raises(ValueError, match="empty"):
        search_betas(Terms(zs[:0], vt[:0], tv[:0]), labels[:0], [1.0], [1.0])


def test_reproduce_smoke_and_dense_cache(tmp_path, tiny_rn):
    args = toy_overrides(tmp_path, tiny_rn, {"search.steps": 4, "fs.train.epochs": 1, "shots": "[2]", "cache_views": 1})
    calip_main.main(["reproduce", *args])
    zs = {r["variant"]: r for r in load_records(protocol="zeroshot", method="calip")}
    assert set(zs) == {"val", "val_b2", "val_b3", "val_wrong_axis", "test_oracle"}  # no paper betas for toy
    assert zs["val_b2"]["metrics"]["beta3"] == 0.0 and zs["val_b3"]["metrics"]["beta2"] == 0.0
    dg = load_records(protocol="domain_generalization", method="calip")
    assert {r["dataset"] for r in dg} == {"toy", "toy_shift"} and all(r["source"] == "toy" for r in dg)
    fs = load_records(protocol="fewshot", method="calip_fs")
    assert [(r["shots"], r["seed"]) for r in fs] == [(2, 1)] and 0 <= fs[0]["metrics"]["top1"] <= 100
    # zs_top1 is zero-shot CLIP on the same cached features
    ds = build_dataset("toy", tmp_path / "data")
    feats = dense_features(bundle_for({"arch": "tiny-rn", "pretrained": str(tmp_path / "tiny-rn.pt")}),
                           "toy", "test", ds.test)
    assert feats["dense"].shape == (len(ds.test), 4, tiny_rn.embed_dim)
    F_t = zeroshot_classifier(tiny_rn, ds.classnames, [ds.template])
    zs_acc = (cosine_logits(feats["global"], F_t, 1.0).argmax(-1) == feats["labels"]).float().mean() * 100
    assert zs["val"]["metrics"]["zs_top1"] == pytest.approx(float(zs_acc), abs=1e-3)
    # a rerun finds every record and computes nothing
    assert calip_main.train(__import__("common.config", fromlist=["x"]).load_config(
        calip_main.CONFIG, "embedded", args[1::2])) == []


def test_selection_split_never_uses_test(tmp_path, tiny_rn):
    from dataclasses import replace
    from common.engine.protocols import Task
    toy_overrides(tmp_path, tiny_rn)
    ds = build_dataset("toy", tmp_path / "data")
    cfg = {"val_from_train": 2}
    assert calip_main.selection_split(Task(cfg, tiny_rn, ds, None, 0, None)) == ("val", ds.val)
    no_val = replace(ds, val=[])  # like ImageNet, whose official val is our test split
    name, items = calip_main.selection_split(Task(cfg, tiny_rn, no_val, None, 0, None))
    assert name == "val_from_train" and len(items) == 2 * ds.num_classes
    assert {d.impath for d in items} <= {d.impath for d in ds.train}
    with pytest.raises(ValueError, match="val_from_train"):
        calip_main.selection_split(Task({"val_from_train": 0}, tiny_rn, no_val, None, 0, None))


def test_pruned_beta_search_equals_brute_force():
    from papers.calip.method import Terms
    g = torch.Generator().manual_seed(0)
    n, K = 300, 12
    terms = Terms(torch.randn(n, K, generator=g), torch.randn(n, K, generator=g), 5 * torch.randn(n, K, generator=g))
    labels = torch.randint(0, K, (n,), generator=g)
    terms = Terms(terms[0].round(decimals=1), *terms[1:])  # some exact ties too
    g2, g3 = beta_grid(3.0, 15), beta_grid(0.5, 11)
    acc = torch.tensor([[(fuse(terms, b2, b3).argmax(-1) == labels).float().mean().item() * 100 for b3 in g3]
                        for b2 in g2])
    best = int(torch.nonzero(acc.flatten() == acc.max())[0])
    b2, b3, got = search_betas(terms, labels, g2, g3)
    assert (b2, b3) == (pytest.approx(g2[best // len(g3)]), pytest.approx(g3[best % len(g3)]))
    assert got == pytest.approx(acc.max().item(), abs=1e-4)


def test_train_views_from_a_shared_pool_equal_direct_encoding(tmp_path, tiny_rn):
    from common.data import fewshot_split
    from common.engine.dense import dense_train_views, train_pool
    toy_overrides(tmp_path, tiny_rn)
    full = build_dataset("toy", tmp_path / "data")
    few = fewshot_split(full, 2, seed=1)
    pool = train_pool("toy", tmp_path / "data", "full")
    assert train_pool("toy", tmp_path / "data", "fewshot") is None and len(pool) == len(full.train)
    direct = dense_train_views(tiny_rn, "toy", few.train, transform="test", views=1)[0]
    shared = dense_train_views(tiny_rn, "toy", few.train, transform="test", views=1, pool=pool)[0]
    assert torch.equal(direct["labels"], shared["labels"])
    assert torch.allclose(direct["global"], shared["global"], atol=1e-5)
    assert torch.allclose(direct["dense"], shared["dense"], atol=1e-5)
    with pytest.raises(ValueError, match="not in the pool"):
        dense_train_views(tiny_rn, "toy", few.train, transform="test", pool=pool[:1])

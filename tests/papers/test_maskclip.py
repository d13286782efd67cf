"""MaskCLIP: the value path against the attention it replaces, PD / KS against hand-computed cases, the evaluation
pass against mmseg's accumulated mIoU, and a seconds-long smoke run of the entry point on a toy segmentation set."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import metrics
from common.clip import encode_image_hooked, resnet_feature_map
from common.clip.visual import attention_pool_tokens, value_path_dense, vit_embeds, vit_keys, vit_value_path
from common.data import Dataset, Datum, build_dataset, read_split_json, register_dataset, write_split_json
from common.engine import load_records
from papers.maskclip import __main__ as mc
from papers.maskclip.method import (PD_FILL, Refinement, chance_miou, class_logits, key_affinity, key_smooth,
                                    prompt_denoise, refine, upsample_predict)
from papers.maskclip.segment import Setting, fold_ids, resized_size, run_pass, size_batches
from tests.papers.helpers import toy_overrides

TOY_SEG = ["red", "green", "blue"]
RGB = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


def write_toy_seg(root: Path, size: int = 32, per_split=(2, 3, 6)) -> Path:
    """Images of two coloured halves (left / right, random classes) and their masks; a border row is ignored."""
    rng = np.random.default_rng(0)
    folder = root / "toy_seg"
    splits = {}
    for split, n in zip(("train", "val", "test"), per_split):
        items = []
        for i in range(n):
            a, b = rng.choice(3, 2, replace=False)
            img = np.zeros((size, size, 3), np.uint8)
            mask = np.zeros((size, size), np.uint8)
            img[:, : size // 2], mask[:, : size // 2] = RGB[a], a
            img[:, size // 2:], mask[:, size // 2:] = RGB[b], b
            mask[0] = 255
            path = folder / "images" / split / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            mpath = folder / "masks" / split / f"{i}.png"
            mpath.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(mpath)
            items.append(Datum(str(path), int(a), TOY_SEG[a]))
        splits[split] = items
    write_split_json(folder / "split_zhou_toy_seg.json", splits, folder / "images")
    return folder


@register_dataset("toy_seg")
def _build_toy_seg(root: Path) -> Dataset:
    root = Path(root)
    s = read_split_json(root / "split_zhou_toy_seg.json", root / "images")
    s = {k: [Datum(d.impath, d.label, d.classname, mask=d.impath.replace("/images/", "/masks/")) for d in v]
         for k, v in s.items()}
    return Dataset("toy_seg", list(TOY_SEG), "a photo of a {}.", s["train"], s["val"], s["test"], root,
                   meta={"ignore_index": 255})


def _images(bundle, n=2, size=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = size or bundle.image_size
    return torch.randn(n, 3, size, size, generator=g)


# ------------------------------------------------------------------------------------- dense features
def test_vit_value_path_is_the_last_block_attending_only_to_itself(tiny_vit):
    """MaskCLIP's ViT value path = the last block run with an attention mask that lets every token see only
    itself (its attention output is then out_proj of its own value), MLP and residuals included."""
    block = tiny_vit.model.visual.transformer.resblocks[-1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, block.attn.embed_dim, generator=g)
    self_only = torch.full((7, 7), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        assert torch.allclose(vit_value_path(block, x), block(x, attn_mask=self_only), atol=1e-5)
        assert not torch.allclose(vit_value_path(block, x), block(x), atol=1e-3)  # q-k attention mixes tokens


def test_vit_keys_are_the_attention_keys_through_out_proj(tiny_vit):
    """With an identity output projection the smoothing keys are exactly the keys the attention scores with."""
    block = copy.deepcopy(tiny_vit.model.visual.transformer.resblocks[-1])
    e = block.attn.embed_dim
    with torch.no_grad():
        block.attn.out_proj.weight.copy_(torch.eye(e))
        block.attn.out_proj.bias.zero_()
        x = torch.randn(1, 5, e)
        k = torch.nn.functional.linear(block.ln_1(x), block.attn.in_proj_weight[e:2 * e], block.attn.in_proj_bias[e:2 * e])
        assert torch.allclose(vit_keys(block, x), k, atol=1e-6)


def test_value_path_dense_at_native_size_matches_the_shared_hooks(tiny_clip):
    """At the model's own input size: ViT value path = encode_image_hooked(dense_mode='value'), its attention
    tokens = the ordinary patch tokens; ResNet value path = v_proj -> c_proj without positions."""
    model, x = tiny_clip.model, _images(tiny_clip)
    with torch.no_grad():
        out = value_path_dense(model, x, keys=True, attention=True)
        n, h, w, d = out["dense"].shape
        assert d == tiny_clip.embed_dim and out["keys"].shape[:2] == (n, h * w)
        if tiny_clip.arch == "tiny-vit":
            _, val = encode_image_hooked(model, x, return_dense=True, dense_mode="value")
            _, tok = encode_image_hooked(model, x, return_dense=True)
            assert torch.allclose(out["dense"].reshape(n, h * w, d), val, atol=1e-5)
            assert torch.allclose(out["attention"].reshape(n, h * w, d), tok, atol=1e-5)
        else:
            pool = model.visual.attnpool
            fmap = resnet_feature_map(model, x)
            tokens = fmap.flatten(2).transpose(1, 2)
            assert torch.allclose(out["dense"].reshape(n, h * w, d), pool.c_proj(pool.v_proj(tokens)), atol=1e-5)
            assert torch.allclose(out["keys"], pool.k_proj(tokens), atol=1e-6)


def test_resnet_value_path_is_the_attention_pool_where_attention_is_trivial(tiny_rn):
    """On a 1x1 map the pool attends over two identical tokens [mean; x] = [x; x], so its output at the location
    is c_proj(v_proj(x)): the value path; with q/k zeroed (uniform attention) the pooled output is the mean of
    the value-path features (the pool is linear in its values)."""
    model = copy.deepcopy(tiny_rn.model)
    pool = model.visual.attnpool
    with torch.no_grad():
        x = _images(tiny_rn, size=32)                      # stride 32: a 1x1 map
        out = value_path_dense(model, x, attention=True)
        assert out["dense"].shape[1:3] == (1, 1)
        assert torch.allclose(out["attention"], out["dense"], atol=1e-5)
        for proj in (pool.q_proj, pool.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        x = _images(tiny_rn, size=96)                      # 3x3, another size than the pool's positions
        out = value_path_dense(model, x, attention=True)
        fmap = resnet_feature_map(model, x)
        pooled = attention_pool_tokens(pool, fmap, with_position=False)[:, 0]
        mean_val = pool.c_proj(pool.v_proj(fmap.flatten(2).mean(-1)))
        expected = (mean_val + out["dense"].flatten(1, 2).sum(1)) / (out["dense"].shape[1] * out["dense"].shape[2] + 1)
        assert torch.allclose(pooled, expected, atol=1e-5)


def test_vit_positions_resize_only_off_the_native_grid(tiny_vit):
    visual = tiny_vit.model.visual
    with torch.no_grad():
        x = _images(tiny_vit)
        assert torch.equal(vit_embeds(visual, x), visual._embeds(x))
        big = vit_embeds(visual, _images(tiny_vit, size=2 * tiny_vit.image_size))
        grid = tiny_vit.image_size // visual.conv1.kernel_size[0]
        assert big.shape[1] == 1 + (2 * grid) ** 2
        out = value_path_dense(tiny_vit.model, _images(tiny_vit, size=2 * tiny_vit.image_size))
        assert out["dense"].shape[1:3] == (2 * grid, 2 * grid)


# ------------------------------------------------------------------------------------------ PD and KS
def test_prompt_denoising_drops_only_classes_below_threshold_everywhere():
    # 3 classes, 2 locations: class 2 is never confident; class 1 wins at one location only
    logits = torch.tensor([[[[0.30, 0.20]], [[0.25, 0.23]], [[0.10, 0.12]]]])     # (1, 3, 1, 2)
    prob = torch.softmax(100 * logits, dim=1)
    assert prob[0, 2].max() < 0.5 and 0.5 < prob[0, 1].max() < 0.99 and prob[0, 0].max() > 0.99
    out = prompt_denoise(logits, 0.5)
    assert torch.equal(out[0, :2], logits[0, :2])
    assert torch.all(out[0, 2] == PD_FILL)
    assert torch.equal(prompt_denoise(logits, 0.0), logits)                        # off
    strict = prompt_denoise(logits, 0.99)                                          # drops class 1 too, not class 0
    assert torch.all(strict[0, 1] == PD_FILL) and torch.equal(strict[0, 0], logits[0, 0])


def test_key_smoothing_with_identity_affinity_is_softmax_and_off_is_noop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 2, 3, generator=g) * 0.05
    keys = torch.eye(6).expand(2, 6, 6)                  # orthogonal keys: cosine affinity = identity
    assert torch.allclose(key_affinity(keys), torch.eye(6).expand(2, 6, 6))
    out = key_smooth(logits, keys, t_ks=1.0)
    assert torch.allclose(out, torch.softmax(100 * logits, dim=1), atol=1e-6)
    assert torch.equal(key_smooth(logits, keys, t_ks=0.0), logits)


def test_key_smoothing_hand_computed_and_threshold():
    # 2 locations, 2 classes; keys k0 = (1, 0), k1 = (1, 1): cosine 1/sqrt(2) between them
    logits = torch.tensor([[[[0.02, 0.0]], [[0.0, 0.01]]]])                       # (1, 2, 1, 2)
    keys = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    p = torch.softmax(100 * logits, dim=1)[0, :, 0].T                             # (HW, K)
    c = 2 ** -0.5
    want = torch.stack([p[0] + c * p[1], c * p[0] + p[1]])
    out = key_smooth(logits, keys, t_ks=1.0)
    assert torch.allclose(out[0, :, 0].T, want, atol=1e-6)
    # only positions whose top probability is below t_ks are replaced
    t = float((p[0].max() + p[1].max()) / 2)
    lo, hi = (0, 1) if p[0].max() < p[1].max() else (1, 0)
    part = key_smooth(logits, keys, t_ks=t)[0, :, 0].T
    assert torch.allclose(part[lo], want[lo], atol=1e-6) and torch.allclose(part[hi], p[hi], atol=1e-6)
    # the released code normalises each channel over the locations instead
    k = keys[0] / keys[0].norm(dim=0, keepdim=True)
    assert torch.allclose(key_affinity(keys, "official")[0], k @ k.T)
    assert not torch.allclose(key_affinity(keys, "official"), key_affinity(keys, "cosine"))


def test_refine_applies_pd_before_ks():
    logits = torch.tensor([[[[0.30, 0.20]], [[0.25, 0.29]], [[0.10, 0.12]]]])
    keys = torch.eye(2)[None]
    out = refine(logits, keys, Refinement(t_pd=0.5, t_ks=1.0))
    assert torch.allclose(out[0, 2], torch.zeros(1, 2), atol=1e-30)               # dropped class: probability 0
    assert torch.allclose(out.sum(1), torch.ones(1, 1, 2), atol=1e-6)
    with pytest.raises(ValueError, match="keys"):
        refine(logits, None, Refinement(t_ks=1.0))
    with pytest.raises(ValueError, match="thresholds"):
        Refinement(t_pd=1.5)


def test_class_logits_are_cosines_and_upsampling_keeps_halves():
    dense = torch.tensor([[[[2.0, 0.0], [0.0, 3.0]]]])                          # (1, 1, 2, 2): h=1, w=2, D=2
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = class_logits(dense, text)
    assert torch.allclose(s[0, :, 0], torch.tensor([[1.0, 0.0], [2 ** -0.5, 2 ** -0.5]]), atol=1e-6)
    pred = upsample_predict(s, (4, 8), (2, 4))
    assert pred.shape == (1, 2, 4)
    assert torch.equal(pred[0], torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]]))


def test_chance_miou_and_folds():
    # two classes of equal share: random guessing gives IoU (1/4) / (1/2 + 1/2 - 1/4) = 1/3 each
    assert chance_miou(torch.tensor([5, 5])) == pytest.approx(100 / 3)
    # an absent class does not count; one class alone: IoU = 1/2 / (1/2 * 1 + ...) with K = 2
    assert chance_miou(torch.tensor([4, 0])) == pytest.approx(50.0)
    f = fold_ids(10, 3)
    assert sorted(torch.bincount(f).tolist()) == [3, 3, 4] and torch.equal(f, fold_ids(10, 3))
    with pytest.raises(ValueError):
        fold_ids(2, 3)


def test_choose_takes_the_val_best_and_the_first_on_ties():
    scores = {"naive": 1.0, "raw": 2.0, "pd@0.1": 3.0, "pd@0.5": 3.0, "ks@1.0": 2.5, "ks_pd@0.1,1.0": 4.0}
    assert mc.choose("pd", scores) == "pd@0.1"
    assert mc.choose("ks", scores) == "ks@1.0" and mc.choose("raw", scores) == "raw"
    assert mc.choose("ks_pd", scores) == "ks_pd@0.1,1.0"


# ------------------------------------------------------------------------------------- evaluation pass
def test_pass_equals_mmseg_accumulated_miou_and_leaves_the_model_unchanged(tmp_path, tiny_rn):
    write_toy_seg(tmp_path / "data")
    ds = build_dataset("toy_seg", tmp_path / "data")
    before = {k: v.clone() for k, v in tiny_rn.model.state_dict().items()}
    text = torch.nn.functional.normalize(torch.randn(5, tiny_rn.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    vocabs = {"base": text[:3], "more": text}                                     # 2 extra (distractor) classes
    settings = {"raw": Setting("value"), "naive": Setting("attention"), "kspd": Setting("value", Refinement(0.5, 1.0))}
    folds = fold_ids(len(ds.test), 2)
    kw = dict(num_classes=3, folds=folds, n_folds=2, mean=(0.5,) * 3, std=(0.25,) * 3, batch_size=4)
    cms, kept = run_pass(tiny_rn, ds.test, 64, settings, vocabs, keep=[0, 3], **kw)
    cms2, _ = run_pass(tiny_rn, ds.test, 64, settings, vocabs, **kw)
    assert all(torch.equal(cms[k], cms2[k]) for k in cms)                          # deterministic
    assert all(torch.equal(v, tiny_rn.model.state_dict()[k]) for k, v in before.items())
    # recompute one setting image by image, as mmseg does, from the kept predictions of the whole split
    _, every = run_pass(tiny_rn, ds.test, 64, {"raw": Setting("value")}, {"more": text}, keep=range(len(ds.test)),
                        **kw)
    total = np.zeros((4, 4), np.int64)
    for i, d in enumerate(ds.test):
        truth = np.asarray(Image.open(d.mask), np.int64)
        pred = np.minimum(every[i][("more", "raw")], 3)
        total += metrics.confusion_matrix(pred, truth, 4, 255)
    assert np.array_equal(cms[("more", "raw")].sum(0).numpy(), total)
    assert total[:, 3].sum() == cms[("more", "raw")][:, :, 3].sum()             # distractor predictions: errors
    assert set(kept) == {0, 3} and kept[0]["image"].shape == (32, 32, 3) and kept[0][("base", "kspd")].shape == (32, 32)
    assert (cms[("base", "raw")][:, 3, :].sum() == 0) and (cms[("base", "raw")][:, :, 3].sum() == 0)


def test_keep_ratio_resize_size_batches_and_real_style_masks(tmp_path, tiny_vit):
    """mmcv's keep-ratio rescale (long side -> test size), batches of one image size, and mmseg's
    reduce_zero_label masks (0 = background -> ignored, k -> k-1) as the real VOC/Context/ADE loaders give them."""
    assert resized_size(500, 375, 512) == (512, 384) and resized_size(375, 500, 512) == (384, 512)
    items = []
    for i, (w, h) in enumerate([(40, 24), (24, 40), (40, 24)]):
        img = np.full((h, w, 3), 80 * i, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[: h // 2] = 1 + i                                        # raw classes 1..3; the rest is background
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / f"{i}_m.png")
        items.append(Datum(str(tmp_path / f"{i}.png"), -1, mask=str(tmp_path / f"{i}_m.png")))
    assert size_batches(items, 8) == [[0, 2], [1]]
    text = torch.nn.functional.normalize(torch.randn(3, tiny_vit.embed_dim), dim=-1)
    cms, kept = run_pass(tiny_vit, items, 48, {"raw": Setting("value")}, {"v": text}, num_classes=3,
                         folds=torch.zeros(3, dtype=torch.long), n_folds=1, mean=(0.5,) * 3, std=(0.25,) * 3,
                         reduce_zero_label=True, keep=[1])
    cm = cms[("v", "raw")][0]
    assert int(cm.sum()) == 3 * 12 * 40 and cm[:, 3].sum() == 0                  # only the labelled halves count
    assert cm.sum(1)[:3].tolist() == [480, 480, 480]                            # raw k -> class k-1
    assert kept[1][("v", "raw")].shape == (40, 24)                              # predictions at the image's size


def test_selection_never_uses_test(tmp_path):
    from dataclasses import replace
    from common.errors import ConfigError
    write_toy_seg(tmp_path / "data")
    ds = build_dataset("toy_seg", tmp_path / "data")
    assert mc.selection_items({"val_images": 0}, ds) == ds.val
    no_val = replace(ds, val=[])                     # like the real sets, whose val split is their test split
    items = mc.selection_items({"val_images": 1}, no_val)
    assert len(items) == 1 and items[0] in ds.train
    with pytest.raises(ConfigError, match="val_images"):
        mc.selection_items({"val_images": 0}, no_val)


# ----------------------------------------------------------------------------------------- entry point
def _args(tmp_path, bundle, extra=None):
    write_toy_seg(tmp_path / "data")
    args = toy_overrides(tmp_path, bundle, {"datasets": "[toy_seg]", "shots": None, "dg_source": None,
                                            "dg_targets": None, "xd_source": None, "seeds": "[1, 2]",
                                            "test_scale": "[1.0, 1.5]", "pd_grid": "[0.3, 0.5]", "ks_grid": "[1.0]",
                                            "distractor_names": "[yellow, purple]", "figure_images": 2,
                                            "figure_dir": str(tmp_path / "figs"), "eval_batch_size": 4,
                                            "templates": "single",
                                            **(extra or {})})
    return args


def test_reproduce_smoke_records_folds_variants_and_figure(tmp_path, tiny_rn):
    ckpt = tmp_path / "tiny-rn.pt"
    args = _args(tmp_path, tiny_rn, {"reproduce_backbones": f"{{tiny-rn: {ckpt}}}"})
    mc.main(["reproduce", *args])
    recs = load_records(paper="maskclip", protocol="segmentation")
    assert {r["dataset"] for r in recs} == {"toy_seg", "toy_seg+distractors"}
    assert {r["variant"] for r in recs} == set(mc.VARIANTS) and {r["seed"] for r in recs} == {1, 2}
    assert len(recs) == 2 * len(mc.VARIANTS) * 2
    for r in recs:
        m = r["metrics"]
        assert 0 <= m["miou"] <= 100 and m["test_size"] in (64, 96) and r["selected_on"] in ("val", None)
        assert r["fold"]["images"] == 3 and r["n_classes"] == (5 if r["dataset"].endswith("distractors") else 3)
    official = [r for r in recs if r["variant"] == "ks_pd_official"]
    assert all((r["metrics"]["t_pd"], r["metrics"]["t_ks"], r["ks_norm"]) == (0.5, 1.0, "official") for r in official)
    assert {r["metrics"]["t_pd"] for r in recs if r["variant"] == "pd"} <= {0.3, 0.5}
    assert (tmp_path / "figs" / "overlays_embedded_toy_seg_tiny-rn.png").is_file()
    # a rerun finds every record and computes nothing
    assert mc.main(["eval", *args]) == []


def test_train_builds_classifiers_only(tmp_path, tiny_rn, capsys):
    mc.main(["train", *_args(tmp_path, tiny_rn)])
    assert "toy_seg+distractors: 5 classes" in capsys.readouterr().out
    assert load_records(paper="maskclip") == []


@pytest.mark.parametrize("override, message", [
    ("test_scale=[0.0]", "test_scale"),
    ("test_size=512", "exactly one of test_size"),
    ("variants=[raw, nope]", "variants"),
    ("pd_grid=[1.5]", "pd_grid"),
    ("distractor_names=[red]", "absent classes"),
    ("seeds=[1, 1]", "seeds"),
    ("datasets=[toy]", "no segmentation masks"),
    ("shots=[1]", "does not use"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, tiny_rn, capsys, override, message):
    args = _args(tmp_path, tiny_rn)
    if override.startswith("datasets=[toy]"):
        from tests.fixtures.toy import write_toy
        write_toy(tmp_path / "data", "toy")
    with pytest.raises(SystemExit) as exc:
        mc.main(["eval", *args, "--set", override])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert load_records(paper="maskclip") == []


def test_eval_real_profile_on_fixture_trees(tmp_path, tiny_rn):
    """The real profile's loaders (mmseg layouts, reduce_zero_label masks, no val split: thresholds on train images)."""
    from common.clip import save_clip_checkpoint
    from tests.fixtures import real_layouts as rl
    root = tmp_path / "DATA"
    rl.make_voc2012_seg(root)
    rl.make_ade20k(root)
    ckpt = save_clip_checkpoint(tiny_rn.model, tmp_path / "rn.pt")
    sets = {"arch": "tiny-rn", "pretrained": str(ckpt), "data_root": str(root), "datasets": "[voc2012_seg, ade20k]",
            "seeds": "[1, 2]", "test_size": 64, "val_images": 2, "templates": "single", "pd_grid": "[0.5]",
            "ks_grid": "[1.0]", "figure_images": 0}
    mc.main(["eval", "--profile", "real", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    recs = load_records(paper="maskclip", profile="real")
    assert {r["dataset"] for r in recs} == {"voc2012_seg", "ade20k"}
    assert {r["n_classes"] for r in recs} == {20, 150} and len(recs) == 2 * len(mc.VARIANTS) * 2
    assert all(r["metrics"]["test_size"] == 64 and 0 <= r["metrics"]["miou"] <= 100 for r in recs)
